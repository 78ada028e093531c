"""Single-pattern CDI phasing: what `cdi phase2d` and `cdi phase3d` share.

Method, top to bottom:

1. Input. A diffraction pattern and its mask (1 = masked / unmeasured, as spipy), by default the
   latest `cdi simulate` result; a detector's frame (or a stack of frames, added up) is centred
   on the direct beam, cut or padded, and binned as input.centre/crop/binning say
   (xpr.cdi.frame). As spipy: optionally padded
   to the next power of two (padding floats), `inner_mask` (beamstop radius: floats),
   `outer_mask` (intensities beyond this radius set to zero), `outer_outer_mask` with
   `mask_edges` (pixels between the two radii float), `subtract_percentile` (a background level
   subtracted). Non-finite pixels float; negative ones become 0.
2. Initial support: a disc/ball of radius `spherical_support`; by default (`initial_support:
   auto`) a disc/ball of `support_size_factor` x the support size: the given one
   (`support_size` / `voxel_number`), or without one the size estimated from the area of the
   pattern's thresholded |q|-weighted autocorrelation (xpr.phasing.support_init). Behind a
   beamstop that hides the central speckle the plain autocorrelation cannot be filled in and
   its thresholded set follows the fill and the dead lines, not S - S: it neither sizes nor
   shapes the support reliably (docs/cdi.md).
   Shrink-wrap then tightens it, with a known size as a floor (size_rule floor).
3. Iterations: a schedule (spipy string or xFrame blocks; xpr.phasing.schedule) with shrink-wrap
   woven in, run on a batch of independent repeats from random phases (or from init_model), each
   repeat seeded on its own; repeats are split into chunks over processes (xpr.parallel).
   Optionally (ga.generations > 1) in generations, the repeats ranked, culled and bred with the
   best between them (guided repeats, cohere's GA: xpr.phasing.genetic, `phase_generations`).
   The repeats take shrink-wrap's relative threshold in turns (`repeat_threshold_factors`: by
   default 6 of 8 repeats 0.15 and 2 of them 0.05 of the blurred maximum), since no one threshold
   suits every object; the free deviance ranks them, and after the first generation every repeat
   continues with the first-listed threshold that did as well as any (within
   merge.deviance_tolerance).
4. Merging: the repeats with the lowest free Poisson deviance on the held-out pixels (or, with
   `merge.select_by: e_mod`, the lowest final modulus error) are aligned (translation, global
   phase, twin) to the best one and averaged; the PRTF per shell of |q| tells which resolution
   was phased reproducibly.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from xpr import memory, parallel, plot
from xpr.cdi import frame, geometry
from xpr.backend import BackendSpec, cpu
from xpr.errors import InputError, SettingsError
from xpr.io import read_array
from xpr.io.checks import check_intensities
from xpr.io.cxi import save_cxi_result
from xpr.io.h5 import recorded_beam_centre
from xpr.io.readers import read_pattern
from xpr.options import options, setting
from xpr.phasing import engine, genetic, merge, schedule
from xpr.phasing.likelihood import BandModulusProjection, free_deviance, free_pixels
from xpr.phasing.projections import ModulusProjection, SupportProjection, centred_radius
from xpr.phasing.support_init import autocorrelation_size, autocorrelation_support, equivalent_radius
from xpr.phasing.shrinkwrap import ShrinkWrap
from xpr.settings import Frozen

# ---------------------------------------------------------------------------------------------
# 1. input


def load_pattern(settings, archive, dimensions):
    """(intensity, masked, source) with zero frequency at the centre; masked: True = float.
    Files, datasets and masks as xpr.io.readers.read_pattern finds them (CXI, NeXus, ...);
    junk refused and scattered negative values clipped by xpr.io.checks."""
    inp = settings.input
    source = inp.data_path
    if source is None:
        source = archive.home.latest("cdi", "simulate", f"{settings.structure_name}.h5")
    shape = None if inp.shape is None else tuple(int(n) for n in inp.shape)
    intensity, mask, where = read_pattern(source, dataset=inp.get("dataset"), mask_path=inp.mask_path,
                                          mask_dataset=inp.get("mask_dataset"), shape=shape)
    sentinels = frame.detector_sentinels(intensity)
    if sentinels is not None and sentinels.any():
        archive.log.info("%d pixel values at the %s maximum (detector gaps and dead pixels) masked",
                         int(sentinels.sum()), intensity.dtype)
        mask = sentinels if mask is None else (np.asarray(mask, bool) | sentinels)
        intensity = np.where(sentinels, 0, intensity).astype(intensity.dtype)
    intensity = np.squeeze(intensity) if intensity.ndim > dimensions else intensity
    if mask is not None and mask.ndim > intensity.ndim:
        mask = np.squeeze(mask)
    intensity, mask = frame.sum_frames(intensity, mask, dimensions, inp.get("frames"), where)
    if intensity.ndim != dimensions:
        stack = ("; a stack of frames? input.frames: sum adds them up"
                 if intensity.ndim == dimensions + 1 else "")
        raise InputError(f"expected a {dimensions}-D pattern, got shape {list(intensity.shape)}{stack}",
                         file=where, key="input.data_path")
    mask = np.zeros(intensity.shape, dtype=bool) if mask is None else \
        (np.squeeze(mask) if mask.ndim > dimensions else mask)
    if mask.shape != intensity.shape:
        raise InputError(f"mask shape {list(mask.shape)} differs from the pattern's "
                         f"{list(intensity.shape)}", file=inp.mask_path or where, key="input.mask_path")
    intensity, _ = check_intensities(intensity, mask, file=where, key="input.data_path",
                                     log=archive.log)
    intensity, mask = centred_frame(intensity, mask, inp, dimensions, source, where, archive.log)
    return intensity.astype(np.float64), mask, where


def centred_frame(intensity, mask, inp, dimensions, source, where, log):
    """The pattern cut or padded around its centre and binned (input.centre, crop, binning;
    xpr.cdi.frame); unchanged when the data are centred and not binned."""
    centre_setting = inp.get("centre")
    binning = frame.binning_factors(frame.binning_setting(inp), dimensions)
    if centre_setting is None and all(b == 1 for b in binning):
        return intensity, mask
    if centre_setting is None:
        centre, how = [n // 2 for n in intensity.shape], "the array's centre (input.centre null)"
    else:
        recorded = recorded_beam_centre(source) if centre_setting == "auto" and dimensions == 2 else None
        centre, how = frame.resolve_centre(centre_setting, intensity, mask, dimensions, recorded, where)
    crop = inp.get("crop") or "largest"
    centred, centred_mask = frame.recentre(intensity, mask, centre, crop, binning)
    if min(centred.shape) < 16:
        raise InputError(f"centre {centre} lies {min(min(c, n - 1 - c) for c, n in zip(centre, intensity.shape))} "
                         f"px from the edge of the {list(intensity.shape)} pattern: cropped around it "
                         f"only {list(centred.shape)} remain; input.crop: pad keeps every pixel",
                         file=where, key="input.crop")
    log.info("pattern centred: zero frequency at %s (%s), %s %s -> %s%s", centre, how,
             "padded" if crop == "pad" else "cut", list(intensity.shape), list(centred.shape),
             "" if all(b == 1 for b in binning) else f", binned {binning}")
    return centred, centred_mask


def pad_to_pow2(intensity, masked):
    """Centred zero padding to the next power of two per axis; padded pixels float."""
    target = tuple(1 << int(np.ceil(np.log2(n))) for n in intensity.shape)
    if target == intensity.shape:
        return intensity, masked
    before = [t // 2 - n // 2 for t, n in zip(target, intensity.shape)]
    index = tuple(slice(b, b + n) for b, n in zip(before, intensity.shape))
    padded = np.zeros(target)
    padded[index] = intensity
    padded_mask = np.ones(target, dtype=bool)
    padded_mask[index] = masked
    return padded, padded_mask


def prepare(intensity, masked, inp):
    """spipy's input treatment (see the module docstring); returns (intensity, masked)."""
    if inp.padd_to_pow2:
        intensity, masked = pad_to_pow2(intensity, masked)
    masked = masked | ~np.isfinite(intensity)
    intensity = np.where(np.isfinite(intensity), np.clip(intensity, 0.0, None), 0.0)
    radius = np.asarray(centred_radius(intensity.shape))
    if inp.inner_mask:
        masked = masked | (radius <= float(inp.inner_mask))
    if inp.outer_mask is not None:
        intensity = np.where(radius > float(inp.outer_mask), 0.0, intensity)
        if inp.mask_edges and inp.outer_outer_mask is not None:
            between = (radius > float(inp.outer_mask)) & (radius <= float(inp.outer_outer_mask))
            masked = masked | between
    if inp.subtract_percentile is not None:
        values = intensity[~masked & (intensity > 0)]
        if values.size:
            level = np.percentile(values, float(inp.subtract_percentile))
            intensity = np.clip(intensity - level, 0.0, None)
    return intensity, masked


# ---------------------------------------------------------------------------------------------
# 2. initial support


def initial_support_for(intensity_fft, measured_fft, inp, log=None, support_size=None,
                        estimated_size=None):
    """The first support (centred): a disc/ball of radius `spherical_support` when given; else
    with `initial_support: auto` (default) a disc/ball of `support_size_factor` x the support
    size: the given one (`support_size` / `voxel_number`), or without one the size estimated
    from the area of the pattern's thresholded autocorrelation (support_init.autocorrelation_size);
    `autocorrelation` (the thresholded autocorrelation itself, xpr.phasing.support_init), `size`
    and `disc` (a quarter of the pattern's side) choose one."""
    shape = np.shape(intensity_fft)
    kind = "disc" if inp.spherical_support else str(inp.initial_support)
    if kind == "auto":
        kind = "size"
        if not support_size:        # the size estimated from the autocorrelation's area
            support_size = estimated_size or estimate_support_size(intensity_fft, measured_fft,
                                                                   inp, log)
    if kind == "size" and not support_size:
        raise InputError("initial_support: size needs phasing_parameters.support_size (2-D) or "
                         "voxel_number (3-D)", key="input.initial_support")
    if kind == "autocorrelation":
        ac = inp.autocorrelation
        support = autocorrelation_support(intensity_fft, measured_fft, threshold=float(ac.threshold),
                                          sigma=float(ac.sigma),
                                          scale=None if ac.scale is None else float(ac.scale))
        if log is not None:
            log.info("initial support: thresholded autocorrelation, %d px (equivalent radius "
                     "%.1f px)", int(support.sum()), equivalent_radius(support))
        return support
    if kind == "size":
        radius = min(size_radius(len(shape), float(inp.support_size_factor) * float(support_size)),
                     initial_support_radius(shape))
        if log is not None:
            log.info("initial support: %s of radius %.1f px (%g x the support size %d, at most a "
                     "quarter of the side)", "disc" if len(shape) == 2 else "ball", radius,
                     float(inp.support_size_factor), int(support_size))
        return np.asarray(centred_radius(shape)) <= radius
    radius = initial_support_radius(shape, inp.spherical_support)
    if log is not None:
        log.info("initial support: %s of radius %.1f px", "disc" if len(shape) == 2 else "ball", radius)
    return np.asarray(centred_radius(shape)) <= radius


def confines_shrink_wrap(options, inp, estimated_size, log=None) -> bool:
    """Whether shrink-wrap keeps the support inside the initial one. `auto`: yes, unless the
    initial support is the disc sized from the estimated size (no size given, `initial_support:
    auto`): that estimate is 0.36-3.0x the true area over the robustness family (docs/cdi.md), so
    a disc drawn from it may be smaller than the object, and confining to it would keep the
    support too small for ever (the 256^2 polygon at os 4: merged 0.48, and 0.03 unconfined)."""
    confine = options.sw_confine_to_initial
    if confine != "auto":
        return bool(confine)
    sized_from_estimate = (estimated_size is not None and not inp.spherical_support
                           and str(inp.initial_support) == "auto")
    if sized_from_estimate and log is not None:
        log.info("shrink-wrap not confined to the initial disc: its size is only estimated")
    return not sized_from_estimate


def estimate_support_size(intensity_fft, measured_fft, inp, log=None):
    """The object's size (px/voxels) estimated from the pattern (support_init.autocorrelation_size,
    with the autocorrelation settings of `inp`), at least 1."""
    ac = inp.autocorrelation
    size = max(autocorrelation_size(intensity_fft, measured_fft, threshold=float(ac.threshold),
                                    sigma=float(ac.sigma)), 1.0)
    if log is not None:
        log.info("no support size given: %d px estimated from the autocorrelation's area "
                 "(|S - S| / 2^n)", int(round(size)))
    return size


def size_radius(ndim, size):
    """Radius (px) of the disc (2-D) or ball (3-D) of `size` pixels/voxels."""
    if ndim == 2:
        return float(np.sqrt(size / np.pi))
    return float((3.0 * size / (4.0 * np.pi)) ** (1.0 / 3.0))


def noise_band(setting, intensity, masked):
    """Half-width of the Poisson band in sqrt(counts): the setting, or (null) 0.5 when the measured
    values are whole numbers (photon counts), else 0 (exact moduli: the data are not counts)."""
    if setting is not None:
        return float(setting)
    values = np.asarray(intensity)[~np.asarray(masked)]
    counts = values.size > 0 and bool(np.all(np.abs(values - np.rint(values)) < 1e-6))
    return 0.5 if counts else 0.0


def initial_support_radius(shape, spherical_support=None):
    """The given radius, or a quarter of the smallest pattern side: the largest object radius
    that oversampling 2 per axis allows, so a loose disc/ball around any phasable object."""
    if spherical_support:
        return float(spherical_support)
    return min(shape) / 4.0


# ---------------------------------------------------------------------------------------------
# 3. iterations (one chunk of repeats; a module-level function so processes can run it)


def phase_chunk(task, shared=None, progress=None):
    """Phase one chunk of repeats: task = {"seeds": [...]}, shared = the pattern, the initial
    support, the steps and the options (the same for every chunk; see `run`). progress: an
    optional bar advanced once per iteration (only in the calling process)."""
    task = dict(shared or {}, **task)
    options = task["options"]
    backend = task["backend"].create()
    xp = backend.xp
    shape = task["intensity_fft"].shape
    seeds = task["seeds"]
    repeats = len(seeds)
    initial = xp.asarray(task["initial_support"])

    free = task.get("free_fft")                     # optional: free pixels, Poisson band
    band = float(options.modulus_band or 0.0)
    if band or free is not None:
        P_M = BandModulusProjection(backend, xp.asarray(task["intensity_fft"]),
                                    xp.asarray(task["measured_fft"]), band=band,
                                    free=None if free is None else xp.asarray(free),
                                    background=options.background, repeats=repeats,
                                    metrics_every=options.e_mod_every)
    else:
        P_M = ModulusProjection(backend, xp.asarray(task["intensity_fft"]),
                                xp.asarray(task["measured_fft"]),
                                background=options.background, repeats=repeats)
    P_S = SupportProjection(positivity=options.positivity, threshold=options.value_threshold,
                            imag_limit=options.imag_limit, backend=backend)
    shrink_wrap = ShrinkWrap(backend, shape, threshold=options.sw_threshold,
                             support_size=options.support_size, sigma=_last(options.sw_sigma),
                             confine_to=initial if options.sw_confine_to_initial else None,
                             max_shrink=options.sw_max_shrink, size_rule=options.sw_size_rule,
                             threshold_factors=repeat_factors(task.get("threshold_factors"), seeds),
                             reference=options.sw_reference)
    support = xp.broadcast_to(initial, (repeats,) + shape).copy()
    if task.get("start") is not None:      # a later generation (ga): the bred objects and supports
        rows = task["rows"]
        x = xp.asarray(task["start"]["object"][rows]).astype(backend.complex_dtype)
        support = xp.asarray(task["start"]["support"][rows]).astype(bool)
    elif task["init_model"] is not None:
        model = xp.asarray(task["init_model"]).astype(backend.complex_dtype)
        x = xp.broadcast_to(model, (repeats,) + shape).copy()
    else:
        x = engine.random_starts(backend, P_M.amplitude, support, seeds)
    x, support, history = engine.iterate(task["steps"], x, support, P_M, P_S, shrink_wrap, xp,
                                         progress=progress,
                                         metrics_every=options.metrics_every)
    e_con_its, e_con = history.e_con_array()
    result = {"seeds": list(seeds), "object": backend.asnumpy(x), "support": backend.asnumpy(support),
              "e_mod": history.e_mod_array(), "e_con": e_con, "e_con_iterations": e_con_its}
    if free is not None:
        observed, expected = free_deviance(x, xp.asarray(task["intensity_fft"]), free, backend,
                                           expected=True)
        result["free_deviance"] = observed.astype(np.float32)
        result["expected_free_deviance"] = expected.astype(np.float32)
    return result


def threshold_factors_by_seed(options, seeds):
    """{seed: shrink-wrap threshold factor}: the repeats take `repeat_threshold_factors` in turn
    (repeat i the (i mod n)-th); None when there are none (every repeat uses the threshold)."""
    factors = options.sw_threshold_factors
    if not factors:
        return None
    return {int(seed): float(factors[i % len(factors)]) for i, seed in enumerate(seeds)}


def repeat_factors(by_seed, seeds):
    """The threshold factors of these repeats (None: all 1)."""
    return None if not by_seed else [by_seed[int(seed)] for seed in seeds]


def continuing_factor(factors, by_seed, seeds, score, tolerance):
    """The threshold factor every repeat continues with after a generation: the first of
    `factors` (their order is the preference) whose best repeat scored within (1 + tolerance) of
    the best of all. A lower threshold is taken only where it fits the held-out pixels clearly
    better: where both fit as well (a compact object, deviances 1.035 against 1.04) the looser
    support of the lower one only lets more noise in (256^2 os 8: 0.064 against 0.012 merged)."""
    score = np.asarray(score, dtype=float)
    ok = np.isfinite(score)
    limit = float(np.min(score[ok])) * (1.0 + float(tolerance or 0.0))
    mine = np.asarray([by_seed[int(seed)] for seed in seeds], dtype=float)
    # the best repeat's own factor always qualifies, so one is found
    return next(float(factor) for factor in factors
                if np.any(ok & (mine == float(factor)) & (score <= limit)))


def compile_steps(settings, source=None):
    """The schedule of the settings, with periodic shrink-wrap woven in."""
    plain = settings.to_dict() if hasattr(settings, "to_dict") else settings
    pp = plain["phasing_parameters"]
    steps = schedule.compile_schedule(plain["phasing"]["iters"], plain["phasing"].get("main_loop"),
                                      beta=pp["beta"], source=source)
    sw = settings.phasing_parameters.shrink_wrap
    if sw.every:
        steps = schedule.with_periodic_shrink_wrap(steps, int(sw.start), int(sw.every),
                                                   sw.stop, sigma=_plain(sw.sigma),
                                                   threshold=_plain(sw.threshold))
    return steps


def _last(value):
    return float(value[-1]) if isinstance(value, (list, tuple)) else float(value)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _chunks(n, parts):
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# ---------------------------------------------------------------------------------------------
# the worker


def run(settings, archive, dimensions):
    inp = settings.input
    intensity, masked, source = load_pattern(settings, archive, dimensions)
    intensity, masked = prepare(intensity, masked, inp)
    shape = intensity.shape
    archive.log.info("pattern %s from %s: %d of %d pixels float", "x".join(map(str, shape)),
                     source, int(masked.sum()), masked.size)
    pixel_size = pixel_size_for(inp, dimensions, shape, archive.log)
    init_model = _init_model(inp, shape)
    intensity_fft = np.fft.ifftshift(intensity)
    measured_fft = np.fft.ifftshift(~masked)
    options = phasing_options(settings, dimensions,
                              modulus_band=noise_band(settings.phasing_parameters.noise_band, intensity, masked))
    estimated = None if options.support_size else estimate_support_size(intensity_fft, measured_fft,
                                                                         inp, archive.log)
    initial_support = initial_support_for(intensity_fft, measured_fft, inp, archive.log,
                                          support_size=options.support_size,
                                          estimated_size=estimated)
    options = replace(options, sw_confine_to_initial=confines_shrink_wrap(options, inp, estimated, archive.log))
    if init_model is not None and not inp.spherical_support:
        initial_support = initial_support | (np.abs(init_model) > 0)
    fraction = float(settings.merge.free_fraction or 0.0)
    free = free_pixels(measured_fft, fraction, seed=0) if fraction else None
    if free is not None:
        archive.log.info("free pixels held out of the fit for scoring: %d (%.1f %% of the measured)",
                         int(free.sum()), 100.0 * free.sum() / max(int(measured_fft.sum()), 1))
    steps = compile_steps(settings)
    archive.log.info("schedule: %s", schedule.describe(steps))

    archive.log.info("modulus constraint: %s", f"Poisson band +-{options.modulus_band:.2f} sqrt(counts)"
                     if options.modulus_band else "exact moduli")
    by_seed = threshold_factors_by_seed(
        options, parallel.task_seeds(int(settings.phasing.seed), int(settings.phasing.repeats)))
    if by_seed:
        archive.log.info("shrink-wrap thresholds taken by the repeats in turn: %s (x %g of the "
                         "blurred maximum); the free deviance ranks them",
                         ", ".join(f"{f:g}" for f in options.sw_threshold_factors), options.sw_threshold)
    problem = {
        "intensity_fft": intensity_fft.astype(np.float32), "measured_fft": measured_fft,
        "threshold_factors": by_seed,
        "free_fft": free,
        "initial_support": initial_support, "init_model": init_model, "steps": steps,
        "options": options,
        "backend": BackendSpec.from_settings(settings),
    }
    repeats = phase_repeats(settings, archive, problem)
    repeats, steps = rescue_if_stagnated(settings, archive, problem, repeats)
    data = {"intensity": intensity, "mask": masked, "initial_support": initial_support}
    if pixel_size is not None:
        data["pixel_size_m"] = np.asarray(pixel_size, dtype=np.float64)
    return merge_and_write(settings, archive, f"phase{dimensions}d.h5", repeats, data,
                           attrs={"schedule": schedule.describe(steps), "source": str(source)})


def best_fit(repeats):
    """The lowest free deviance of the repeats over what that repeat's own model expects (about 1
    for a right object; check_convergence), or None without held-out pixels."""
    if "free_deviance" not in repeats or "expected_free_deviance" not in repeats:
        return None
    observed = np.asarray(repeats["free_deviance"], dtype=float)
    expected = np.maximum(np.asarray(repeats["expected_free_deviance"], dtype=float), 1e-12)
    return float(np.min(observed / expected))


def rescue_settings(settings):
    """The second run's settings: phasing.rescue's schedule, and its shrink-wrap threshold
    relative to the blurred amplitude's RMS (phasing_parameters.shrink_wrap.threshold_reference)."""
    plain = settings.to_dict()
    rescue = plain["phasing"]["rescue"]
    plain["phasing"] = dict(plain["phasing"], iters=rescue["iters"], main_loop=None)
    wrap = dict(plain["phasing_parameters"]["shrink_wrap"], threshold=rescue["threshold"],
                threshold_reference=rescue["threshold_reference"])
    plain["phasing_parameters"] = dict(plain["phasing_parameters"], shrink_wrap=wrap)
    return Frozen(plain)


def rescue_if_stagnated(settings, archive, problem, repeats):
    """When the best repeat explains the held-out counts worse than phasing.rescue.fit_above times
    what its own model expects (stagnated: the object superposed with its twin, a support cut
    short), phase all repeats again with the rescue's long HIO stage and RMS-relative shrink-wrap,
    and keep the rescue when its fit is at least phasing.rescue.min_gain times lower (measured,
    docs/cdi.md: of five stagnated family cases two recovered, 256^2 os 3 0.310 -> 0.148 and os 8
    0.167 -> 0.001, two improved, one kept; at 1e5 photons a rescue fitting 1.15x better was
    further from the object, 0.268 -> 0.793). Returns (repeats, their schedule)."""
    rescue = settings.phasing.rescue
    first = best_fit(repeats)
    if rescue.fit_above is None or first is None or first <= float(rescue.fit_above):
        return repeats, problem["steps"]
    again = rescue_settings(settings)
    steps = compile_steps(again)
    archive.log.warning("the best repeat's free deviance is %.2f x its expected value (above "
                        "phasing.rescue.fit_above %g): phasing again with %s and shrink-wrap at "
                        "%g of the %s", first, float(rescue.fit_above), rescue.iters,
                        float(rescue.threshold), rescue.threshold_reference)
    options = replace(problem["options"], sw_threshold=float(rescue.threshold),
                      sw_reference=rescue.threshold_reference)
    second = phase_repeats(again, archive, dict(problem, steps=steps, options=options, rescue=True))
    fit = best_fit(second)
    keep = fit is not None and fit * float(rescue.min_gain) <= first
    archive.log.info("rescue run: best fit %.2f against %.2f (kept when at least %g x lower): "
                     "keeping the %s run", fit, first, float(rescue.min_gain), "rescue" if keep else "first")
    return (second, steps) if keep else (repeats, problem["steps"])


def pixel_size_for(inp, dimensions, shape, log):
    """The object's pixel size per axis in metres (xpr.cdi.geometry), or None, logged."""
    values, origin = geometry.geometry(inp, inp.data_path, dimensions)
    binning = frame.binning_factors(frame.binning_setting(inp), dimensions)
    pixel = geometry.object_pixel_size(values, shape, binning)
    if pixel is None:
        missing = [key for (name, key) in geometry.KEYS if values[name] is None]
        log.info("object pixel size unknown (no %s): sizes in pixels", ", ".join(missing))
        return None
    log.info("object pixel size %s nm (wavelength %.4g nm, distance %.4g m, detector pixel %s um "
             "x binning %s; from %s)", " x ".join(f"{dx * 1e9:.3g}" for dx in pixel),
             values["wavelength"] * 1e9, values["distance"],
             " x ".join(f"{p * 1e6:.3g}" for p in values["pixel_size"]), binning,
             ", ".join(sorted(set(origin.values()))))
    return pixel


def merge_and_write(settings, archive, filename, repeats, data, attrs):
    """Select repeats by their free deviance (or final eMod: merge.select_by), align them to the
    best (shift, global phase, twin), average,
    compute the PRTF; write `filename` (merged/, repeats/, data/), the figures and, in 3-D, the
    merged density as .vts. Also used by `cdi merge` over the repeats of several runs.

    repeats: object, support, e_mod, e_con, e_con_iterations, seed (leading axis = repeat);
    data: intensity, mask (True = floats), initial_support, and pixel_size_m (the object's
    pixel size per axis in metres) when the geometry is known.
    """
    final = repeats["e_mod"][:, -1]
    archive.log.info("final eMod per repeat: %s", np.array2string(final, precision=4))
    score, tolerance = final, settings.merge.error_tolerance
    if settings.merge.select_by == "free_deviance" and "free_deviance" in repeats:
        score = np.asarray(repeats["free_deviance"], dtype=float)
        tolerance = settings.merge.deviance_tolerance
        archive.log.info("free Poisson deviance per repeat: %s", np.array2string(score, precision=4))
    backend = cpu(BackendSpec.from_settings(settings).precision)    # merging runs on the host
    selected = merge.select(score, keep_fraction=float(settings.merge.keep_fraction),
                            tolerance=tolerance)
    merged, aligned = merge.merge_repeats(repeats["object"], selected, backend,
                                          allow_twin=bool(settings.merge.remove_twin))
    measured_fft = np.fft.ifftshift(~np.asarray(data["mask"], dtype=bool))
    shells, prtf = merge.prtf(aligned, measured_fft, backend)
    archive.log.info("merged %d of %d repeats (eMod %.4f .. %.4f, score %.4f .. %.4f)",
                     len(selected), len(final), final[selected].min(), final[selected].max(),
                     score[selected].min(), score[selected].max())
    check_convergence(archive.log, repeats, selected)

    support = repeats["support"][selected[0]]
    pixel_size = data.get("pixel_size_m")          # known from the geometry, or absent
    resolution = geometry.half_period_resolution(shells, prtf, merged.shape, pixel_size)
    if resolution is not None:
        archive.log.info("PRTF falls below 1/e at |q| = %.1f px%s", resolution[0],
                         "" if resolution[1] is None else
                         f": half-period resolution {resolution[1] * 1e9:.3g} nm")
    scale, data_scale = {}, {}                     # the object's pixel size, when known
    if pixel_size is not None:
        scale["pixel_size_m"] = data_scale["pixel_size_m"] = np.asarray(pixel_size, dtype=np.float64)
        if resolution is not None:
            scale["half_period_resolution_m"] = np.float64(resolution[1])
    archive.save_h5(filename, {
        "merged": {"object": merged.astype(np.complex64), "support": support.astype(np.uint8),
                   "prtf": prtf, "prtf_radius_px": shells.astype(np.float32),
                   "aligned_repeats": aligned.astype(np.complex64), **scale},
        "repeats": dict(repeats, object=repeats["object"].astype(np.complex64),
                        support=repeats["support"].astype(np.uint8),
                        selected=np.asarray(selected, dtype=np.int64)),
        "data": {"intensity": np.asarray(data["intensity"]).astype(np.float32),
                 "mask": np.asarray(data["mask"]).astype(np.uint8),
                 "initial_support": np.asarray(data["initial_support"]).astype(np.uint8),
                 **data_scale},
    }, main=True, attrs=dict(attrs, mask_convention="1 = masked / unmeasured"))
    cxi = save_cxi_result(archive.file(filename[:-3] + ".cxi"), merged.astype(np.complex64), support,
                          prtf=prtf, prtf_radius=shells, command=filename[:-3], note=attrs,
                          pixel_size=pixel_size,
                          settings=settings.to_dict() if hasattr(settings, "to_dict") else None)
    archive.log.info("wrote %s (CXI)", cxi)
    _figures(archive, merged, support, repeats, selected, shells, prtf, pixel_size)
    if merged.ndim == 3:
        archive.save_vts("vtk/merged_density.vts", np.abs(merged).astype(np.float32),
                         grid="cartesian")
    return {"object": merged, "prtf": prtf, "e_mod": repeats["e_mod"], "selected": selected}


STAGNATION_RATIO = 2.0    # free deviance over what the repeat's own model expects: a fit left unfinished


def fit_ratio(repeats, selected):
    """(ratio, observed, expected) of the best merged repeat (the lowest free deviance among
    `selected`): its free deviance over the deviance its own model expects; None without
    held-out pixels (no `free_deviance` / `expected_free_deviance` in `repeats`)."""
    if "free_deviance" not in repeats or "expected_free_deviance" not in repeats:
        return None
    best = min((int(i) for i in selected), key=lambda i: float(repeats["free_deviance"][i]))
    observed = float(repeats["free_deviance"][best])
    expected = float(repeats["expected_free_deviance"][best])
    return observed / max(expected, 1e-12), observed, expected


def check_convergence(log, repeats, selected):
    """Say how well the best merged repeat explains the held-out counts: its free deviance over
    the deviance its own model expects of Poisson counts (xpr.phasing.likelihood.expected_deviance;
    about 1 for a right object at any dose). Above STAGNATION_RATIO the run has not found the
    object and the log says so as a warning. Measured (docs/cdi.md): recovered 2-D cases of the
    robustness family 0.98-1.95; stagnated high-dose shapes 45-55 (256^2 os 3, 1e9 photons) and
    5.9 (512^2 os 20). A low-dose failure can fit as well as the truth and is not told (256^2
    shapes os 8, 1e6 photons, complex: 1.19 at error 0.38). Returns the ratio (None without
    held-out pixels)."""
    fit = fit_ratio(repeats, selected)
    if fit is None:
        return None
    ratio, observed, expected = fit
    log.info("free deviance of the best merged repeat %.4f, %.2f x what its own model expects (%.4f)",
             observed, ratio, expected)
    if ratio > STAGNATION_RATIO:
        log.warning("the merged object does not explain the held-out counts (free deviance %.2f x its "
                    "expected value, above %g): the repeats have likely stagnated; more repeats "
                    "(phasing.repeats), the support size (phasing_parameters.support_size) or a "
                    "longer HIO stage (phasing.iters, phasing.rescue.iters) may help (docs/cdi.md)",
                    ratio, STAGNATION_RATIO)
    return ratio


def _init_model(inp, shape):
    if inp.init_model is None:
        return None
    model = np.asarray(read_array(inp.init_model, key="input.init_model"))
    if model.shape != shape:
        raise InputError(f"init_model has shape {list(model.shape)}, the (padded) pattern "
                         f"{list(shape)}", file=inp.init_model, key="input.init_model")
    return model


@options("cdi", "phase2d")
class PhasingOptions:
    """The constraints one batch of repeats is phased with (phasing_parameters.* and the metric
    cadence of settings_defaults/cdi/phase2d.yaml, whose defaults these are)."""

    background: bool = setting("phasing_parameters.background")
    positivity: bool = setting("phasing_parameters.positivity")
    value_threshold: float | None = setting("phasing_parameters.value_threshold")
    imag_limit: float | None = setting("phasing_parameters.imag_limit")
    support_size: int | None = setting("phasing_parameters.support_size")
    metrics_every: int = setting("phasing.metrics_every")
    e_mod_every: int = setting("phasing.e_mod_every")
    sw_threshold: float = setting("phasing_parameters.shrink_wrap.threshold", _last)
    sw_sigma: float | tuple = setting("phasing_parameters.shrink_wrap.sigma")
    sw_confine_to_initial: bool | str = setting("phasing_parameters.shrink_wrap.confine_to_initial")
    sw_max_shrink: float | None = setting("phasing_parameters.shrink_wrap.max_shrink")
    sw_size_rule: str = setting("phasing_parameters.shrink_wrap.size_rule")
    sw_reference: str = setting("phasing_parameters.shrink_wrap.threshold_reference")
    sw_threshold_factors: tuple | None = setting(
        "phasing_parameters.shrink_wrap.repeat_threshold_factors",
        lambda v: None if v is None else tuple(v))
    modulus_band: float = 0.0        # sqrt(counts): the Poisson band, from phasing_parameters.noise_band and the pattern


@options("cdi", "phase3d")
class PhasingOptions3D(PhasingOptions):
    """The 3-D constraints: the support size counts voxels (phasing_parameters.voxel_number)."""

    support_size: int | None = setting("phasing_parameters.voxel_number")


def phasing_options(settings, dimensions: int, **given) -> PhasingOptions:
    return (PhasingOptions if dimensions == 2 else PhasingOptions3D).from_settings(settings, **given)


def phase_repeats(settings, archive, problem, seeds=None):
    """All repeats, in batches over the multi_process engine; returns stacked numpy results.
    With ga.generations > 1 the generations of xpr.phasing.genetic (each one such call on the
    given `seeds`; problem["start"]: the bred starts, one row per seed)."""
    if seeds is None:
        if genetic.ga_generations(settings) > 1:
            return phase_generations(settings, archive, problem)
        seeds = parallel.task_seeds(int(settings.phasing.seed), int(settings.phasing.repeats))
    repeats = len(seeds)
    spread = settings.get("multi_process")
    gpus = problem["backend"].gpus()           # on cupy: one worker per GPU
    workers = parallel.n_workers(spread, repeats, gpus)
    batch = spread.get("batch_size") if spread else None
    n_tasks = max(workers, -(-repeats // int(batch))) if batch else workers
    n_tasks = memory.plan_cdi_phase(problem["intensity_fft"].shape, repeats, workers, n_tasks,
                                    double=problem["backend"].precision == "double", log=archive.log,
                                    generations=genetic.ga_generations(settings),
                                    rescue=bool(problem.get("rescue")))
    tasks = [{"seeds": [seeds[i] for i in chunk], "rows": list(chunk)} for chunk in _chunks(repeats, n_tasks)]
    n_iterations = schedule.total_iterations(problem["steps"])
    archive.log.info("%d repeats x %d iterations in %d batch(es)", repeats, n_iterations,
                     len(tasks))
    failures = []
    if len(tasks) == 1:     # one batch in this process: a bar over iterations, with eMod
        bar = archive.progress(total=n_iterations, desc="phasing")
        results = [phase_chunk(tasks[0], shared=problem, progress=bar)]
    else:
        bar = archive.progress(total=len(tasks), desc="phasing batches")
        results = parallel.map(phase_chunk, tasks, spread, shared=problem,
                               on_result=lambda index, result: bar.update(1),
                               tolerate_failures=True, gpus=gpus)
        failures = [r for r in results if isinstance(r, parallel.TaskFailure)]
        for failure in failures:
            archive.log.warning("batch %d (seeds %s) failed: %s", failure.index,
                                tasks[failure.index]["seeds"], failure.error)
        results = parallel.require_success(results, spread)
    bar.close()
    keys = ["object", "support", "e_mod", "e_con"]
    for key in ("free_deviance", "expected_free_deviance"):
        if all(key in r for r in results):
            keys.append(key)
    stacked = {key: np.concatenate([r[key] for r in results]) for key in keys}
    stacked["seed"] = np.asarray([s for r in results for s in r["seeds"]], dtype=np.uint64)
    stacked["e_con_iterations"] = results[0]["e_con_iterations"]
    # the batches that failed after their retries: recorded, their repeats left out of the merge
    stacked["failed_seeds"] = np.asarray([s for f in failures for s in tasks[f.index]["seeds"]], dtype=np.uint64)
    return stacked


# ---------------------------------------------------------------------------------------------
# guided repeats: the genetic algorithm over generations (ga.*; xpr.phasing.genetic)


@options("cdi", "phase2d")
class GeneticOptions:
    """The `ga` block of settings_defaults/cdi/phase2d.yaml (phase3d's is the same)."""

    generations: int = setting("ga.generations")
    breed: str = setting("ga.breed")
    metric: str = setting("ga.metric")
    cull: int = setting("ga.cull")
    resolution: tuple | None = setting("ga.resolution", lambda v: None if v is None else tuple(v))
    iters: str | None = setting("ga.iters")


def generation_steps(settings):
    """The compiled schedule of the generations after the first (ga.iters, with the run's periodic
    shrink-wrap), or None when they repeat phasing.iters."""
    iters = (settings.get("ga") or {}).get("iters")
    if iters is None:
        return None
    plain = settings.to_dict()
    plain["phasing"] = dict(plain["phasing"], iters=iters, main_loop=None)
    try:
        return compile_steps(Frozen(plain))
    except InputError as error:                     # it names phasing.iters: say which schedule
        raise SettingsError(error.message, key="ga.iters") from None


def _require_positive_numbers(values, what, key, unit=""):
    """Exit 2 (SettingsError naming `key`) unless every one of `values` is a number > 0."""
    for value in values or ():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SettingsError(f"{what} must be numbers > 0{unit}, got {list(values)!r}", key=key)


def check_repeat_thresholds(settings):
    """shrink_wrap.repeat_threshold_factors: numbers > 0 (exit 2 otherwise)."""
    _require_positive_numbers(settings.phasing_parameters.shrink_wrap.get("repeat_threshold_factors"),
                              "threshold factors", "phasing_parameters.shrink_wrap.repeat_threshold_factors")


def check_ga(settings):
    """What the settings grammar cannot say about `ga` (exit 2): ga.iters compiles; the low-pass
    widths are numbers > 0."""
    ga = GeneticOptions.from_settings(settings)
    generation_steps(settings)
    _require_positive_numbers(ga.resolution, "low-pass widths", "ga.resolution",
                              unit=" (fractions of Nyquist)")


def phase_generations(settings, archive, problem):
    """ga.generations > 1: each generation is one `phase_repeats` over the surviving repeats
    (batched and spread over processes as usual); between generations, in this process, the
    repeats are ranked, culled and bred with the best (xpr.phasing.genetic.evolve)."""
    ga = GeneticOptions.from_settings(settings)
    plan = genetic.Plan(generations=int(ga.generations), breed=str(ga.breed), metric=str(ga.metric),
                        cull=int(ga.cull), resolution=tuple(ga.resolution or ()))
    if plan.metric == "free_deviance" and problem.get("free_fft") is None:
        archive.log.warning("ga.metric free_deviance needs held-out pixels (merge.free_fraction > 0): "
                            "ranking by the final eMod instead")
        plan = replace(plan, metric="e_mod")
    options = problem["options"]
    backend = cpu(problem["backend"].precision)          # breeding runs on the host, as merging
    initial = problem["initial_support"]
    # the children's supports: the run's last shrink-wrap rule (a child's support is new, so there
    # is no old one whose shrinking max_shrink would limit)
    shrink_wrap = ShrinkWrap(backend, initial.shape, threshold=options.sw_threshold,
                             support_size=options.support_size, sigma=_last(options.sw_sigma),
                             confine_to=initial if options.sw_confine_to_initial else None,
                             max_shrink=None, size_rule=options.sw_size_rule,
                             reference=options.sw_reference)
    later = generation_steps(settings) or problem["steps"]
    archive.log.info("genetic algorithm: %d generations (%d iterations, then %d each: %s), breeding "
                     "%s, ranking by %s, culling %d per generation%s", plan.generations,
                     schedule.total_iterations(problem["steps"]), schedule.total_iterations(later),
                     schedule.describe(later), plan.breed, plan.metric,
                     plan.culled_after(0), f", low-pass widths {list(plan.resolution)}"
                     if plan.resolution else "")

    by_seed = problem.get("threshold_factors")        # seed -> shrink-wrap threshold factor
    tolerance = settings.merge.deviance_tolerance if plan.metric == "free_deviance" else \
        settings.merge.error_tolerance
    continuing = {}      # the threshold factor the next generation's repeats all take

    def children_supports(children, support):
        factor = continuing.get("factor")
        return shrink_wrap(children, support,
                           threshold_factors=None if factor is None else [factor] * children.shape[0])

    def run_generation(generation, seeds, start):
        width = plan.low_pass(generation)
        data = dict(problem, start=start, steps=problem["steps"] if generation == 0 else later)
        if start is not None and by_seed:       # every child continues with the chosen threshold
            data["threshold_factors"] = {int(s): continuing["factor"] for s in seeds}
        if width is not None:
            data["intensity_fft"] = (problem["intensity_fft"] *
                                     genetic.low_pass_weight(initial.shape, width)).astype(np.float32)
        result = phase_repeats(settings, archive, data, seeds=seeds)
        if by_seed and generation == 0:        # later generations all took the chosen factor
            continuing["factor"] = continuing_factor(options.sw_threshold_factors, by_seed, result["seed"],
                                                     genetic.scores(result, plan.metric), tolerance)
            archive.log.info("shrink-wrap threshold %g x %g kept for the next generations (the first "
                             "factor scoring within the tolerance %g of the best)", continuing["factor"],
                             options.sw_threshold, float(tolerance or 0.0))
        return result

    seeds = parallel.task_seeds(int(settings.phasing.seed), int(settings.phasing.repeats))
    return genetic.evolve(run_generation, seeds, plan, backend, children_supports, log=archive.log,
                          allow_twin=bool(settings.merge.remove_twin))


def _figures(archive, merged, support, repeats, selected, shells, prtf, pixel_size=None):
    cut = (lambda a: a) if merged.ndim == 2 else (lambda a: a[a.shape[0] // 2])
    fig, axes = plot.figure(1, 3)
    scale = {}
    if pixel_size is not None:           # axes in um about the array centre
        (rows, dy), (cols, dx) = zip(merged.shape[-2:], np.asarray(pixel_size)[-2:] * 1e6)
        scale = {"extent": (-(cols // 2) * dx, (cols - cols // 2) * dx, -(rows // 2) * dy,
                            (rows - rows // 2) * dy)}
    plot.image(axes[0], np.abs(cut(merged)), "merged amplitude", **scale)
    plot.image(axes[1], np.where(cut(support), np.angle(cut(merged)), np.nan), "merged phase",
               cmap="twilight", **scale)
    plot.image(axes[2], cut(support).astype(float), "support", colorbar=False, **scale)
    if scale:
        for ax in axes:
            ax.set(xlabel="x (um)", ylabel="y (um)")
    archive.savefig(fig, "object.png")

    chosen = set(np.asarray(selected).tolist())
    fig, axes = plot.figure(1, 3)
    for i, (e_mod, e_con) in enumerate(zip(repeats["e_mod"], repeats["e_con"])):
        style = dict(lw=1.5, color="C0") if i in chosen else dict(lw=0.5, color="0.6")
        axes[0].semilogy(np.arange(1, len(e_mod) + 1), e_mod, **style)
        if len(e_con):
            axes[1].plot(repeats["e_con_iterations"], e_con, **style)
    axes[0].set(xlabel="iteration", ylabel="eMod", title="modulus error (merged repeats in blue)")
    axes[1].set(xlabel="iteration", ylabel="eCon", title="norm fraction outside the support")
    axes[2].plot(shells, prtf)
    axes[2].axhline(1 / np.e, ls=":", color="0.5")
    axes[2].set(ylim=(0, 1.05), xlabel="|q| (pixels)", ylabel="PRTF",
                title="phase-retrieval transfer function")
    archive.savefig(fig, "errors_prtf.png")
