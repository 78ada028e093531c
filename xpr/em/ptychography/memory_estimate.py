"""Peak-memory estimates of the 4D-STEM commands (`simulate_4dstem`, `dpc`, `wdd`, `tcbf`; ptycho's
own are in xpr.em.ptychography.ptycho), and the plans that keep each run inside what it may use.

Every estimate is an xpr.memory.Estimate: the arrays the code holds at its largest stage,
counted from the code, in bytes, with a per-item part for what the command can shrink:

* `simulate_4dstem`: the probe positions propagated together (`simulation.batch_size`);
* `dpc`, `wdd`, `tcbf`: the scan is read whole when its working copies fit, else streamed from the
  file in batches of patterns (Experiment.streamed, xpr.em.ptychography.calibration) sized to
  what is left; `wdd` also shrinks its chunk of spatial frequencies, `tcbf` the bright-field
  pixels its transfer function sums at once.

Sizes known from the settings (simulate_4dstem) or from the data file's header (xpr.io.stem4d
opens scans lazily) are checked by each worker's validate(), before the run folder exists: a run
that cannot fit even at the smallest batch stops with exit 2 naming the key, the estimate and
the limit. The factors are checked against tracemalloc peaks in tests/em/test_memory_em.py and
benchmarks/bench_memory.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from xpr import memory
from xpr.errors import InputError

# wdd: bytes per detector pixel of one spatial frequency alive at once in the deconvolution loop
# (P̃ at u − Q evaluated in float64/complex128, χ_P, W_P, H, |W_P|², W_O; measured ≈ 90 on a
# 64² scan, 128² detector): a streamed chunk of frequencies holds max_memory_GB / this
FREQUENCY_WORK_BYTES = 128

DATA_KEY = "experiment.data_path"

# float32 copies of the scan alive while it is read whole and prepared (xpr.em.ptychography.
# calibration, Experiment.from_settings): the file's values, the clipped copy and the copy rolled
# onto the centre (a scan already centred skips the roll: then 2 copies)
READ_COPIES = 3


# ---------------------------------------------------------------------------------------------
# the scan's size from its header

def scan_header(settings, path=None):
    """(number of patterns, detector shape (ky, kx)) of `path` (default experiment.data_path)
    from its header, or None where no path is given (validate() before a run: the default input
    is found in the run) or the file cannot be opened (the worker then says what is wrong)."""
    from xpr.em.ptychography.calibration import experiment_dict
    from xpr.io.stem4d import open_scan

    experiment = experiment_dict(settings["experiment"])
    path = path or experiment.get("data_path")
    if not path:
        return None
    try:
        with open_scan(Path(path).expanduser(), experiment.get("dataset"),
                       experiment.get("scan_size")) as scan:
            return int(scan.n_patterns), tuple(int(n) for n in scan.detector_shape)
    except (OSError, ValueError, InputError):
        return None


def _prepared_pixels(detector, experiment) -> tuple[int, int]:
    """(pixels of a binned pattern, pixels of a binned and padded one)."""
    from xpr.em.ptychography.calibration import detector_processing, pad_px

    data_bin, data_pad = detector_processing(experiment)
    ky, kx = (int(d) // data_bin for d in detector)
    pad = max(0, pad_px(data_pad, kx))
    return ky * kx, (ky + 2 * pad) * (kx + 2 * pad)


def reading_parts(n_patterns, detector, experiment) -> dict:
    """The scan read whole and prepared: the file's values as float32 and two prepared copies
    (clipped, rolled; padded: the padded copy beside the rolled one)."""
    from xpr.em.ptychography.calibration import experiment_dict

    experiment = experiment_dict(experiment)
    binned, padded = _prepared_pixels(detector, experiment)
    raw = 4 * int(n_patterns) * int(np.prod(detector))
    prepared = (READ_COPIES - 1) * binned if padded == binned else binned + padded
    return {"scan as float32": raw, "prepared copies": 4 * int(n_patterns) * prepared}


# ---------------------------------------------------------------------------------------------
# dpc, wdd, tcbf

def direct_in_memory(command, n_patterns, detector, settings) -> memory.Estimate:
    """The peak of `dpc`/`wdd`/`tcbf` with the scan read whole. Per item: wdd's spatial
    frequencies deconvolved at once (`FREQUENCY_WORK_BYTES` per detector pixel each), tcbf's
    bright-field pixels whose transfer-function terms are summed at once (TCBF_TERM_BYTES per
    pixel of the upsampled grid each); dpc has no items.

    Stages (bytes; N patterns of K detector pixels, float32 D = 4 N K):
    reading -- READ_COPIES x D;
    dpc -- after reading, the prepared scan D, the centres of mass and the gradient integration
    on the padded scan grid (two complex64 maps and their spectra: 32 x pad_factor² per point);
    wdd -- transforming: the prepared scan, its normalised and shifted copy, the complex64 copy
    and its transform (D + D + 2D + 2D); deconvolving: the scan and G(k, Q) (3 D) plus a chunk
    of frequencies;
    tcbf -- the prepared scan, the bright-field images (n_bf x N float32) with their complex
    spectra and shifted copies (about 10 float32 copies), plus the transfer function's chunk.
    """
    from xpr.em.ptychography.calibration import experiment_dict

    experiment = experiment_dict(settings["experiment"])
    options = settings[command]
    n = int(n_patterns)
    binned, _ = _prepared_pixels(detector, experiment)
    data = 4 * n * binned
    estimate = memory.Estimate()
    estimate.add("reading and preparing the scan", reading_parts(n, detector, experiment))
    if command == "dpc":
        pad = float(options["pad_factor"])
        estimate.add("integrating the phase gradient", {
            "prepared scan": data, "gradient maps and spectra": int(32 * pad * pad * n) + 64 * n})
    elif command == "wdd":
        estimate.add("transforming over the scan", {"prepared scan": data,
                                                    "normalised, complex and transformed copies": 5 * data})
        estimate.add("deconvolving", {"prepared scan and G(k, Q)": 3 * data},
                     {"spatial frequency at work": FREQUENCY_WORK_BYTES * binned})
    elif command == "tcbf":
        n_bf = bright_field_pixels(binned, experiment, float(options["bright_field_fraction"]))
        upsample = int(options["upsample"])
        estimate.add("aligning the bright-field images", {
            "prepared scan": data, "bright-field images and their spectra": TCBF_IMAGE_COPIES * 4 * n_bf * n})
        estimate.add("summing the transfer function", {"prepared scan": data,
                                                       "bright-field images": 4 * n_bf * n},
                     {"bright-field pixel at work": TCBF_TERM_BYTES * n * upsample ** 2})
    return estimate


def direct_streamed(command, n_patterns, detector, settings) -> memory.Estimate:
    """The peak of `dpc`/`wdd`/`tcbf` on a streamed scan; per item: one pattern of a streamed batch
    (calibration.WORK_COPIES float32 copies while it is prepared). Fixed: the per-scan-point
    maps (centres of mass, dark-field counts, float64) and the command's own scan-sized work
    (dpc's integration, wdd's sums over frequencies, tcbf's bright-field images)."""
    from xpr.em.ptychography.calibration import WORK_COPIES, experiment_dict

    experiment = experiment_dict(settings["experiment"])
    options = settings[command]
    n = int(n_patterns)
    binned, padded = _prepared_pixels(detector, experiment)
    fixed = {"maps per scan point": 40 * n, "mean pattern": 16 * max(binned, padded)}
    if command == "dpc":
        pad = float(options["pad_factor"])
        fixed["gradient maps and spectra"] = int(32 * pad * pad * n)
    elif command == "wdd":
        fixed["sums over frequencies"] = 64 * n
    elif command == "tcbf":
        n_bf = bright_field_pixels(binned, experiment, float(options["bright_field_fraction"]))
        fixed["bright-field images and their spectra"] = TCBF_IMAGE_COPIES * 4 * n_bf * n
    return memory.Estimate().add("streaming the scan", fixed, {
        "pattern of a batch": WORK_COPIES * 4 * max(int(np.prod(detector)), padded)})


# tcbf: float32 copies of the bright-field images alive while they are aligned (the images, the
# device copy, the tapered complex64 images and their spectra, the shifted copies, the
# cross-correlations: measured ≈ 9 on a 32² scan)
TCBF_IMAGE_COPIES = 10
# tcbf.transfer_function: bytes per value of one term (a bright-field pixel × a pixel of the
# upsampled grid): P̃ at k ∓ q (complex128, its modulus, aberration phase, exponent), the term and
# the phase ramp -- measured ≈ 96
TCBF_TERM_BYTES = 112


def bright_field_pixels(binned_pixels, experiment, fraction) -> int:
    """Bright-field pixels tcbf will use: π (fraction · k_α / Δk)² when the convergence angle and
    the detector pixel are given (settings or file), else the whole detector (an upper bound)."""
    from xpr.em.optics import electron_wavelength_A

    conv, rez, kV = (experiment.get(k) for k in ("conv_semiangle_mrad", "rez_pixel_size_A", "acc_voltage"))
    if conv and rez and kV:
        radius = fraction * float(conv) * 1e-3 / electron_wavelength_A(float(kV)) / float(rez)
        return max(1, min(int(binned_pixels), int(math.pi * radius ** 2) + 1))
    return int(binned_pixels or 1)


def plan_direct(command, settings, data_path=None, log=None, limit=None) -> dict:
    """How `dpc`/`wdd`/`tcbf` keep within what they may use (memory.available: the cgroup's grant
    or MemAvailable): read whole when the data are at most `<command>.max_memory_GB` and the
    in-memory estimate fits (wdd/tcbf with their chunk shrunk to fit), else streamed with the
    batch budget shrunk to what is left. Returns dict(memory_GB for load_experiment, chunk
    (wdd's frequencies, tcbf's bright-field pixels per pass; None: the command's own), streamed).
    Exit 2 (InputError naming experiment.data_path) when even one pattern at a time does not fit."""
    from xpr.em.ptychography.calibration import experiment_dict

    header = scan_header(settings, data_path)
    options = settings[command]
    setting = float(options["max_memory_GB"])
    if header is None or int(header[0]) == 0 or 0 in tuple(header[1]):
        # no header, or an empty scan: the worker's reading and junk checks say what is wrong
        return {"memory_GB": setting, "chunk": None, "streamed": None}
    n, detector = header
    limit = limit or memory.available()
    usable = memory.USABLE_FRACTION * limit.bytes
    scan = f"{n} patterns of {detector[0]}x{detector[1]} px"
    what = f"{command} on {scan}"
    nbytes = 4 * n * int(np.prod(detector))
    wanted = wanted_chunk(command, n, settings, _prepared_pixels(
        detector, experiment_dict(settings["experiment"]))[0])
    whole = direct_in_memory(command, n, detector, settings)
    if nbytes <= setting * 1e9:
        chunk = memory.largest_batch(whole, limit, wanted)
        if chunk:
            memory.log_plan(log, what + " read whole", whole, limit, chunk)
            if log is not None and chunk < wanted:
                log.warning("memory: %s %d instead of %d to fit", "frequencies per chunk"
                            if command == "wdd" else "bright-field pixels per pass", chunk, wanted)
            return {"memory_GB": setting, "chunk": chunk if command != "dpc" else None,
                    "streamed": False}
        if log is not None:
            log.warning("memory: %s read whole would need about %s, more than %.0f%% of %s: "
                        "streamed from the file instead", what, whole.describe(1),
                        100 * memory.USABLE_FRACTION, limit)
    streamed = direct_streamed(command, n, detector, settings)
    fixed = streamed.stage_bytes("streaming the scan", 0)
    one_pattern = streamed.stage_bytes("streaming the scan", 1) - fixed
    budget = min(setting * 1e9, usable - fixed, 0.999 * nbytes)
    if budget < one_pattern:
        memory.refuse(streamed.describe(1), limit, DATA_KEY, f"{what}, streamed one pattern at a time",
                      "a machine (or job) with more memory, or a binned detector (experiment.data_bin)",
                      settings=False)
    batch = int(budget // one_pattern)
    memory.log_plan(log, what + f" streamed in batches of {batch}", streamed, limit, batch)
    chunk = None
    if command == "tcbf":            # the images stay; the streamed batches are gone
        _, per_item = whole.stages["summing the transfer function"]
        summing = memory.Estimate().add("summing the transfer function", {"streamed run's maps": fixed}, per_item)
        chunk = max(1, memory.largest_batch(summing, limit, wanted))
    return {"memory_GB": budget / 1e9, "chunk": chunk, "streamed": True}


def wanted_chunk(command, n_patterns, settings, detector_pixels=None) -> int:
    """wdd: wdd.chunk_frequencies; tcbf: the bright-field pixels of tcbf.transfer_function's
    default 4e6 values per pass on the upsampled grid; dpc: 1 (no items)."""
    if command == "wdd":
        return int(settings["wdd"]["chunk_frequencies"])
    if command == "tcbf":
        from xpr.em.ptychography.calibration import experiment_dict
        from xpr.em.ptychography.bright_field import VALUES_PER_CHUNK
        options = settings["tcbf"]
        upsample = int(options["upsample"])
        experiment = experiment_dict(settings["experiment"])
        n_bf = bright_field_pixels(detector_pixels, experiment, float(options["bright_field_fraction"]))
        return max(1, min(n_bf, VALUES_PER_CHUNK // (int(n_patterns) * upsample ** 2)))
    return 1


def validate_direct(command, settings):
    """Before the run folder exists: exit 2 when the scan named by experiment.data_path could not
    be processed even streamed one pattern at a time (its size from the file's header)."""
    plan_direct(command, settings)


# ---------------------------------------------------------------------------------------------
# simulate_4dstem

def simulate_4dstem(settings) -> memory.Estimate:
    """`simulate_4dstem`, items = probe positions propagated together. Counted from
    simulate_4dstem.simulate (N positions, n² detector, n_f = n × oversampling, B = the fine box):

    specimen -- per slice the projected potential's work (q, spectrum, structure factor, the
    scattering factor and its product: ≈ 96 bytes per fine pixel) and the atoms' phase factors
    (complex128, atoms × (ny + nx)); the slices (float32) and the transmission (complex64);
    propagating -- the data (float32 N n²) and the specimen, and per position of a batch the
    model's work arrays for every probe mode (≈ 6 complex64 n_f²: shifted probe, exit wave,
    propagated wave, far field, intensity);
    dose -- the noise-free data, data × dose, the Poisson counts (int64) and their float32 copy
    (20 bytes per data value) beside the specimen;
    truth -- the summed phase (float64), its spectrum and the centred copy (complex128) on B.
    """
    from xpr.em.ptychography import potentials

    sp, ex, sim = settings["specimen"], settings["experiment"], settings["simulation"]
    n = int(ex["detector_size"])
    ny, nx = (int(s) for s in ex["scan_size"])
    n_positions = ny * nx
    rez = float(ex["rez_pixel_size_A"]) if ex.get("rez_pixel_size_A") else 1.0 / (n * float(ex["pixel_size_A"]))
    pixel = 1.0 / (n * rez)
    oversampling = int(sim["oversampling"])
    n_fine = n * oversampling
    step = float(ex["scan_step_A"])
    box = [int(math.ceil((s - 1) * step / pixel)) + 2 * n for s in (ny, nx)]
    box_fine = [b * oversampling for b in box]
    fine_pixels = box_fine[0] * box_fine[1]
    crystal = str(sp["crystal"])
    if crystal in potentials.CRYSTALS:
        (_, _, az), basis = potentials.CRYSTALS[crystal]
        layers = int(sp["layers"])
        z = [b[3] + layer * az for layer in range(layers) for b in basis]
        n_slices = int(math.floor((max(z) - min(z)) / float(sp["slice_thickness_A"]))) + 1
        (ax, ay, _), _ = potentials.CRYSTALS[crystal]
        fine = pixel / oversampling
        atoms = (box_fine[0] * fine / ay + 1) * (box_fine[1] * fine / ax + 1) * len(basis) * layers
    else:
        n_slices, atoms = 1, 0
    specimen = {"slices and transmission": 12 * n_slices * fine_pixels}
    building = {"projected potential of a slice": 96 * fine_pixels,
                "atoms' phase factors": int(16 * atoms * (box_fine[0] + box_fine[1]))}
    data = 4 * n_positions * n * n
    modes = int(ex.get("probe_modes", 1) or 1) if float(ex.get("focal_spread_A", 0) or 0) > 0 else 1
    estimate = memory.Estimate()
    estimate.add("building the specimen", dict(specimen, **building))
    estimate.add("propagating the probe", dict(specimen, data=data),
                 {"position at work": 48 * modes * n_fine * n_fine})
    if ex.get("electrons_per_pattern"):
        estimate.add("adding the dose", dict(specimen, **{"data, dosed and counts": 5 * data}))
    estimate.add("the truth", dict(specimen, data=data, **{"phase and its spectra": 40 * fine_pixels}))
    return estimate


def plan_simulate_4dstem(settings, log=None, limit=None) -> int:
    """The batch of probe positions that fits (simulation.batch_size, or fewer); exit 2 naming
    experiment.scan_size (or experiment.detector_size) when not even one position fits."""
    estimate = simulate_4dstem(settings)
    limit = limit or memory.available()
    ex = settings["experiment"]
    wanted = int(settings["simulation"]["batch_size"])
    what = (f"simulating {ex['scan_size'][0]}x{ex['scan_size'][1]} patterns of "
            f"{ex['detector_size']}x{ex['detector_size']} px")
    batch = memory.largest_batch(estimate, limit, wanted)
    if batch == 0:
        one = estimate.stage_bytes("propagating the probe", 1) - estimate.stage_bytes("propagating the probe", 0)
        key = "experiment.detector_size" if one > memory.USABLE_FRACTION * limit.bytes / 2 else "experiment.scan_size"
        memory.refuse(estimate.describe(1), limit, key, what,
                      "a smaller scan (experiment.scan_size) or detector (experiment.detector_size)")
    memory.log_plan(log, what, estimate, limit, batch)
    if log is not None and batch < wanted:
        log.warning("memory: %d probe positions at a time instead of simulation.batch_size %d",
                    batch, wanted)
    return batch
