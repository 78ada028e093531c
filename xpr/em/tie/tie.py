"""xpr em tie: phase from a through-focal series by the transport-of-intensity equation, refined
with the exact forward model.

Method.
1. Input. `images` (n, y, x) at `defocus_m` (n,) (0 = in focus; positive Δf means the transfer
   function exp(+iπλΔf|q|²)); optics from the settings or the file's attributes. Optional
   `images_flipped` (the specimen turned over, recorded mirrored) and `exact_phase`.
2. Registration (optional). Every image is aligned to the image nearest focus: shift
   candidates from cross-correlations of images low-passed beyond their Fresnel fringes and of
   their gradient magnitudes, then a bounded search of rotation and magnification (an estimate
   on its bound falls back to the shift), then (default) a whole-pixel search of each shift and a
   joint refinement of all shifts and magnifications on the series misfit. Every choice is
   judged by the self-consistency of the series — its forward-model misfit after TIE + a few
   GS–Misell sweeps — and registration is dropped, with a warning, when it does not improve it
   (xpr.em.tie.focal_series).
3. ∂I/∂Δf by a per-pixel least-squares polynomial fit over all defocus values (several pairs
   average the noise, the quadratic term removes the Δf² bias of a ± pair).
4. TIE, k ∂I/∂Δf = ∇·(I∇φ): uniform intensity, or full (Teague's auxiliary function, 1/I
   regularised) with the in-focus intensity. Without an in-focus image the intensity used is
   stated in the log and in the output attribute `in_focus_intensity_source`: by default the
   fit at Δf = 0 corrected for its Δf² bias with the forward model, never silently (I₊+I₋)/2.
   Inverse Laplacian Tikhonov-regularised, q²/(q²+q_c²)², with a frequency cutoff; mirror
   symmetrisation or padding for non-periodic fields.
5. Refinement (default). TIE is exact only as Δf → 0; its O(Δf²) error is a floor at large
   defocus. Starting from the TIE phase and the in-focus amplitude, the wave is fitted to all
   images with the exact transfer function: Gerchberg–Saxton–Misell sweeps or a least-squares
   L-BFGS fit of exp(a + iφ).
6. Flip series: the flipped images are un-mirrored and retrieved the same way, giving φ_e − φ_m;
   φ_e = (φ + φ_flip)/2 and φ_m = (φ − φ_flip)/2.
7. Optional learned correction (extra `ml`, xpr.em.tie.learned): a small CNN trained on
   simulated pairs with this series' optics corrects the TIE phase (`phase_learned`).
8. With the truth known, the rms error inside a centred disk (radius a fraction of the width)
   after removing the mean offset, for the plain TIE and the refined phase.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
from scipy import ndimage, optimize

from xpr import backend as backends
from xpr import plot
from xpr.em.tie import focal_series, image_files, memory_estimate, solvers as tie_solvers
from xpr.em.tie.focal_series import FocalSeries
from xpr.em.optics import electron_wavelength_A
from xpr.errors import InputError
from xpr.io import load_tree
from xpr.io.checks import check_intensities

INPUT_KEY = "input.focal_series"


def validate(settings):
    """Exit 2 before the run folder exists when the series (size from its header) would not fit."""
    memory_estimate.validate_tie(settings)


def run(settings, archive):
    backend = backends.from_settings(settings)
    series = read_focal_series(settings, archive)
    memory_estimate.validate_tie(settings, (len(series.images),) + tuple(series.images.shape[1:])
                                 + (series.images_flipped is not None,), archive.log)
    archive.log.info("%d images %s at defocus %s µm, %.0f kV, pixel %.4g nm", len(series.images),
                     list(series.images.shape[1:]), np.round(series.defocus_m * 1e6, 3).tolist(),
                     series.accelerating_voltage_kV, series.pixel_size_m * 1e9)

    # 2. registration
    registration, seconds = {}, {}
    if settings.registration.enabled:
        start = time.perf_counter()
        registration = register_series(backend, series, settings, archive)
        seconds["registration"] = time.perf_counter() - start

    # 3–5. TIE and refinement of the series (and of the flipped one)
    start = time.perf_counter()
    result = retrieve_phase(backend, series, series.images, settings, archive)
    seconds["retrieval"] = time.perf_counter() - start
    if registration:
        archive.log.info("registration %.2f s = %.1f × the retrieval of the series (%.2f s)",
                         seconds["registration"], seconds["registration"] / seconds["retrieval"],
                         seconds["retrieval"])
    if settings.checks.defocus_sign:
        check_defocus_sign(result["phase_tie"], result["in_focus_intensity"], series, archive.log)
    outputs = {"phase": result["phase"], "phase_tie": result["phase_tie"],
               "amplitude": result["amplitude"], "defocus_m": series.defocus_m}
    if series.images_flipped is not None:
        flipped = retrieve_phase(backend, series, series.images_flipped, settings, archive,
                                 label="flipped series")
        # 6. separation
        for stage in ("", "_tie"):
            key = "phase" + stage
            outputs["phase_flipped" + stage] = flipped[key]
            outputs["phase_electrostatic" + stage] = 0.5 * (result[key] + flipped[key])
            outputs["phase_magnetic" + stage] = 0.5 * (result[key] - flipped[key])
    if registration:
        outputs["registration"] = registration
    # 7. learned correction
    learned = settings.learned_correction
    held_out = {}
    if learned.train or learned.model is not None:
        outputs["phase_learned"], held_out = learned_correction(backend, series, result, settings,
                                                                archive)

    # 8. errors against the truth
    radius = float(settings.evaluation.window_radius_fraction)
    errors = error_table(outputs, series.truth, radius)
    errors.update(held_out)
    for name, value in errors.items():
        archive.log.info("rms error %s: %.4f rad (disk of radius %.2f·N, offset removed)",
                         name, value, radius)
    if errors:
        outputs["errors"] = errors

    attrs = {"in_focus_intensity_source": result["in_focus_intensity_source"],
             "tie_method": settings.tie.method, "refinement": settings.refinement.method,
             "accelerating_voltage_kV": series.accelerating_voltage_kV,
             "pixel_size_m": series.pixel_size_m, "window_radius_fraction": radius,
             "input_file": series.path,
             **{f"{stage}_seconds": value for stage, value in seconds.items()}}
    archive.save_h5("tie.h5", _as_float32(outputs), main=True, attrs=attrs)
    archive.savefig(phase_figure(outputs, series.truth), "phase.png")
    return outputs


# ---------------------------------------------------------------------------------------------
# 1. Input
# ---------------------------------------------------------------------------------------------

def read_focal_series(settings, archive) -> FocalSeries:
    """Read and check the focal-series file; optics from settings, else from its attributes."""
    path = settings.input.focal_series
    if path is None:
        path = archive.home.latest("em", "simulate_focal", f"{settings.structure_name}.h5")
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if len(paths) > 1 or Path(str(paths[0])).suffix.lower() in image_files.SUFFIXES:
        tree, attributes = image_files.read_series(paths, settings.input.defocus_m, INPUT_KEY)
        path = str(paths[0]) if len(paths) == 1 else ", ".join(str(p) for p in paths)
    else:
        path = paths[0]
        tree, attributes = _read_series_file(path)
        if settings.input.defocus_m is not None:
            tree["defocus_m"] = np.asarray([float(d) for d in settings.input.defocus_m])
    return _focal_series(settings, path, tree, attributes)


def _read_series_file(path):
    """The HDF5 focal-series file: its tree and attributes."""
    tree = load_tree(path)
    try:
        with h5py.File(path, "r") as f:
            attributes = {key: _plain(value) for key, value in f.attrs.items()}
    except OSError as err:
        raise InputError(f"not a readable HDF5 file ({err})", file=path, key=INPUT_KEY) from None
    return tree, attributes


def _focal_series(settings, path, tree, attributes) -> FocalSeries:
    images = _image_stack(tree, "images", path)
    if "defocus_m" not in tree:
        raise InputError("the file has no `defocus_m` dataset (defocus of each image, m)",
                         file=path, key=INPUT_KEY)
    defocus = np.atleast_1d(np.asarray(tree["defocus_m"], float)) * int(settings.imaging.defocus_sign)
    if defocus.shape != (len(images),):
        raise InputError(f"`defocus_m` has {defocus.size} values for {len(images)} images",
                         file=path, key=INPUT_KEY)
    if len(np.unique(defocus)) != defocus.size:
        raise InputError(f"defocus values must be distinct, got {defocus.tolist()}", file=path,
                         key=INPUT_KEY)
    flipped = None
    if "images_flipped" in tree:
        flipped = _image_stack(tree, "images_flipped", path)
        if flipped.shape != images.shape:
            raise InputError(f"`images_flipped` has shape {list(flipped.shape)}, `images` "
                             f"{list(images.shape)}: images of different shapes", file=path,
                             key=INPUT_KEY)

    def optic(name, required=True, default=None):
        value = settings.imaging.get(name)
        if value is None:
            value = attributes.get(name, default)
        if value is None and required:
            raise InputError(f"no `{name}`: give imaging.{name} in the settings or as a file "
                             "attribute", file=path, key=f"imaging.{name}")
        return float(value)

    truth = {}
    for name in ("exact_phase", "exact_phase_electrostatic", "exact_phase_magnetic"):
        if name in tree and tree[name] is not None:
            exact = np.asarray(tree[name], float)
            if exact.shape != images.shape[1:]:
                raise InputError(f"`{name}` has shape {list(exact.shape)}, the images "
                                 f"{list(images.shape[1:])}", file=path, key=INPUT_KEY)
            truth[name] = exact
    flip_axis = settings.separation.flip_axis or attributes.get("flip_axis", "x")
    if flip_axis not in ("x", "y"):
        raise InputError(f"flip_axis must be 'x' or 'y', not {flip_axis!r}", file=path,
                         key="separation.flip_axis")
    series = FocalSeries(path=str(path), images=images, defocus_m=defocus,
                         accelerating_voltage_kV=optic("accelerating_voltage_kV"),
                         pixel_size_m=optic("pixel_size_m"),
                         spherical_aberration_m=optic("spherical_aberration_m", False, 0.0),
                         images_flipped=None, flip_axis=flip_axis, truth=truth)
    if flipped is not None:
        series.images_flipped = np.flip(flipped, axis=2 if flip_axis == "x" else 1).copy()
    return series


def _image_stack(tree, name, path):
    """`name` as an (n, y, x) float64 stack with positive, finite intensities, or InputError."""
    if name not in tree or tree[name] is None:
        raise InputError(f"the file has no `{name}` dataset (n, y, x)", file=path, key=INPUT_KEY)
    value = tree[name]
    if isinstance(value, dict):                   # a group of datasets, taken in name order
        value = [value[key] for key in sorted(value, key=lambda k: (len(k), k))]
    if isinstance(value, (list, tuple)):          # a group of separate images
        shapes = [list(np.shape(image)) for image in value]
        if len({tuple(s) for s in shapes}) != 1:
            raise InputError(f"`{name}` holds images of different shapes {shapes}", file=path,
                             key=INPUT_KEY)
        value = np.stack(value)
    value, _ = check_intensities(value, file=path, key=f"{INPUT_KEY} ({name})", what=f"`{name}` intensities")
    images = np.asarray(value, dtype=float)
    if images.ndim != 3 or len(images) < 2:
        raise InputError(f"`{name}` must be a stack (n ≥ 2, y, x), got shape {list(images.shape)}",
                         file=path, key=INPUT_KEY)
    if not np.all(np.isfinite(images)):
        raise InputError(f"`{name}` holds NaN or infinite values", file=path, key=INPUT_KEY)
    for index, image in enumerate(images):
        if image.mean() <= 0 or np.all(image <= 0):
            raise InputError(f"`{name}`[{index}] has zero intensity (mean {image.mean():.3g}): "
                             "an empty or dark-subtracted frame cannot be used", file=path,
                             key=INPUT_KEY)
    return images


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# 2. Registration
# ---------------------------------------------------------------------------------------------

def register_series(backend, series, settings, archive):
    """Align every image (and every un-mirrored flipped image) to the image nearest focus, and
    keep only what makes the series more self-consistent.

    The measure (`check`) is the forward-model misfit of the series: TIE, then `check_sweeps`
    Gerchberg–Saxton–Misell sweeps, amplitude misfit per pixel. Images of one specimen at
    different defocus are consistent with one exit wave only when they are aligned, so it
    judges a registration without knowing the truth, where comparing images at different
    defocus with each other cannot (a strong phase object's defocused images differ from the
    in-focus one by its lens effect and fringes).
    1. Shift candidates per image (focal_series.shift_candidates: low-passed beyond the Fresnel
       fringes of its defocus distance, twice that, gradient magnitudes); with the check, each
       image in turn takes the candidate of least series misfit.
    2. With `rotation_scale`, a bounded search of rotation, magnification and shift from that
       shift; an estimate on its bound falls back to the shift alone (logged).
    3. With `refine` (and the check): a whole-pixel search of each image's shift
       (`coarse_search_px`), then the shifts (and magnifications, rotations: `refine`) of all
       images together minimise the series misfit after `refine_sweeps` sweeps (L-BFGS-B,
       bounded), started from the wave of the series as registered (`refine_start`) in
       `refine_rounds` rounds.
    4. With the check, the misfits of the refined registration, of the registration, of its
       shifts alone and of the unregistered series are compared; the least wins, and the log
       says which.
    Images are resampled band-limited (focal_series.undo_similarity: the noise keeps its
    variance at any sub-pixel position) and pixels whose source lies outside the field take the
    reference image's value. The stacks of `series` are replaced by the chosen ones; returns
    the estimates."""
    options, log = settings.registration, archive.log
    check = bool(options.check)
    wavelength_m = electron_wavelength_A(series.accelerating_voltage_kV) * 1e-10
    reference_index = series.reference_index
    reference = series.images[reference_index].copy()

    def misfit(images, sweeps=int(options.check_sweeps)):
        return series_misfit(backend, series, images, settings, archive, sweeps)

    def undo(image, rotation=0.0, scale=1.0, shift=(0.0, 0.0)):
        return focal_series.undo_similarity(image, rotation, scale, tuple(shift), fill=reference)

    estimates = {}
    stacks = [("images", series.images)]
    if series.images_flipped is not None:
        stacks.append(("images_flipped", series.images_flipped))
    for name, stack in stacks:
        n = len(stack)
        moving = [i for i in range(n) if not (name == "images" and i == reference_index)]
        sigma = {i: focal_series.fresnel_smoothing_px(
            wavelength_m, series.defocus_m[i] - series.defocus_m[reference_index],
            series.pixel_size_m, float(options.smoothing_px), float(options.fresnel_fraction))
            for i in moving}
        # 1. shifts
        candidates = {i: focal_series.shift_candidates(reference, stack[i], sigma[i],
                                                       int(options.upsample)) for i in moving}
        shift = np.zeros((n, 2))
        for i in moving:
            shift[i] = candidates[i]["low_pass"]
        shifted = stack.copy()

        def apply_shift(index, value):
            shifted[index] = undo(stack[index], shift=value)

        for i in moving:
            apply_shift(i, shift[i])
        if check:
            for i in moving:
                distinct = {}
                for method, value in candidates[i].items():
                    if all(np.hypot(*(np.subtract(value, v))) > 0.25 for v in distinct.values()):
                        distinct[method] = value
                if len(distinct) < 2:
                    continue
                scores = {}
                for method, value in distinct.items():
                    apply_shift(i, value)
                    scores[method] = misfit(shifted)
                best = min(scores, key=scores.get)
                shift[i] = distinct[best]
                apply_shift(i, shift[i])
                log.info("%s[%d] shift candidates %s; kept %s", name, i, ", ".join(
                    f"{m} ({distinct[m][0]:.2f}, {distinct[m][1]:.2f}) px misfit {s:.3e}"
                    for m, s in scores.items()), best)
        # 2. rotation and magnification
        rotation, scale, full_shift = np.zeros(n), np.ones(n), shift.copy()
        registered = shifted.copy()
        if bool(options.rotation_scale):
            for i in moving:
                estimate = focal_series.similarity_search(
                    reference, stack[i], tuple(shift[i]), sigma[i], int(options.upsample),
                    float(options.max_rotation_deg), float(options.max_scale),
                    float(options.shift_window_px))
                if estimate["fallback"]:
                    log.warning("%s[%d]: %s — implausible for a stage error (the lens effect of a "
                                "phase object magnifies defocused images); kept the shift only",
                                name, i, estimate["fallback"])
                    continue
                rotation[i], scale[i] = estimate["rotation_deg"], estimate["scale"]
                full_shift[i] = estimate["shift_px"]
                registered[i] = undo(stack[i], rotation[i], scale[i], full_shift[i])
        for i in moving:
            log.info("registered %s[%d] (low-pass σ %.1f px): rotation %.3f°, scale %.4f, "
                     "shift (%.2f, %.2f) px", name, i, sigma[i], rotation[i], scale[i], *full_shift[i])
        parameters = {"registered": (rotation.copy(), scale.copy(), full_shift.copy()),
                      "shifts_only": (np.zeros(n), np.ones(n), shift.copy()),
                      "unregistered": (np.zeros(n), np.ones(n), np.zeros((n, 2)))}
        choices = {"registered": registered, "shifts_only": shifted, "unregistered": stack}
        # 3. joint refinement on the series misfit
        free = REFINED_PARAMETERS.get(str(options.refine))
        if free and not bool(options.rotation_scale):
            free = REFINED_PARAMETERS["shifts"]
        if check and free and moving:
            start = coarse_shift_search(stack, moving, parameters["registered"], undo,
                                        lambda images: misfit(images, int(options.refine_sweeps)),
                                        int(options.coarse_search_px))
            for i in moving:
                if np.any(start[2][i] != parameters["registered"][2][i]):
                    log.info("%s[%d]: coarse search on the series misfit moved the shift to "
                             "(%.2f, %.2f) px", name, i, *start[2][i])
            refined = {"parameters": start,
                       "images": refine_images(stack, registered, moving, start, undo),
                       "evaluations": 0, "fallbacks": []}
            warm_start = str(options.refine_start) == "registered"
            rounds = int(options.refine_rounds) if warm_start else 1
            for round_ in range(rounds):
                if warm_start:
                    objective = warm_started_misfit(backend, series, refined["images"], settings,
                                                    int(options.check_sweeps),
                                                    int(options.refine_sweeps))
                else:
                    def objective(images):
                        return misfit(images, int(options.refine_sweeps))
                result = refine_on_misfit(stack, moving, refined["parameters"], undo, objective,
                                          options, free,
                                          max(1, int(options.refine_evaluations) // rounds))
                result["evaluations"] += refined["evaluations"]
                result["fallbacks"] = refined["fallbacks"] + result["fallbacks"]
                if round_ == 0:
                    start_misfit = result["start"]
                refined = result
            refined["start"] = start_misfit
            parameters["refined"] = refined["parameters"]
            choices["refined"] = refined["images"]
            for i in moving:
                log.info("refined %s[%d] on the series misfit: rotation %.3f°, scale %.4f, shift "
                         "(%.2f, %.2f) px", name, i, refined["parameters"][0][i],
                         refined["parameters"][1][i], *refined["parameters"][2][i])
            for message in refined["fallbacks"]:
                log.warning("%s %s", name, message)
            log.info("%s: refinement of %d parameters, %d misfit evaluations in %d round(s), misfit "
                     "(%d sweeps from the %s) %.3e → %.3e", name, refined["count"],
                     refined["evaluations"], rounds, int(options.refine_sweeps),
                     "wave of the series as registered" if warm_start else "TIE",
                     refined["start"], refined["end"])
        # 4. the check
        if not np.any(rotation != 0) and not np.any(scale != 1):
            choices.pop("shifts_only")
        chosen = "refined" if "refined" in choices else "registered"
        misfits = {}
        if check:
            misfits = {label: misfit(images) for label, images in choices.items()}
            chosen = min(misfits, key=misfits.get)
            log.info("registration check (%s): forward-model misfit per pixel %s; kept %s", name,
                     ", ".join(f"{k} {v:.3e}" for k, v in misfits.items()), chosen)
            best_estimate = "refined" if "refined" in choices else "registered"
            if chosen != best_estimate:
                log.warning("%s: the registration as estimated makes the series less consistent "
                            "than %s; using the series %s", name, chosen.replace("_", " "),
                            chosen.replace("_", " "))
        rotation, scale, full_shift = parameters[chosen]
        stack[...] = choices[chosen].copy()
        estimates[name] = {"rotation_deg": rotation, "scale": scale, "shift_px": full_shift,
                           "kept": chosen, **{f"misfit_{k}": v for k, v in misfits.items()}}
    return estimates


REFINED_PARAMETERS = {"shifts": ("dy", "dx"), "shifts_scale": ("scale", "dy", "dx"),
                      "all": ("rotation", "scale", "dy", "dx")}


def refine_images(stack, base, moving, parameters, undo):
    """`base` with the images `moving` of `stack` resampled with (rotation, scale, shift)."""
    images = base.copy()
    for i in moving:
        images[i] = undo(stack[i], parameters[0][i], parameters[1][i], parameters[2][i])
    return images


def coarse_shift_search(stack, moving, start, undo, misfit, reach_px):
    """Whole-pixel offsets within ±reach_px of each image's shift, image after image, scored by
    the series misfit: a correlation estimate can be a pixel or more off (issue 19: particles at
    ±5 µm, 1 px), too far for the gradient refinement, whose misfit has local minima about a
    pixel apart. Not searched: an offset common to all moving images, to which the misfit is
    least sensitive (an over- and an underfocused image of a phase object shifted together
    still nearly agree; only the in-focus image's absorption contrast tells): on those
    particles it chose a common offset of a pixel, wrongly, after 5 sweeps from the TIE and
    after 20. Returns the parameters with the best offsets."""
    rotation, scale, shift = (np.array(a, float) for a in start)
    if reach_px < 1:
        return rotation, scale, shift
    images = refine_images(stack, stack, moving, (rotation, scale, shift), undo)
    offsets = [(dy, dx) for dy in range(-reach_px, reach_px + 1)
               for dx in range(-reach_px, reach_px + 1)]
    for i in moving:
        scores = {}
        for offset in offsets:
            images[i] = undo(stack[i], rotation[i], scale[i], shift[i] + offset)
            scores[offset] = misfit(images)
        best = min(scores, key=scores.get)
        shift[i] = shift[i] + best
        images[i] = undo(stack[i], rotation[i], scale[i], shift[i])
    return rotation, scale, shift


def refine_on_misfit(stack, moving, start, undo, misfit, options, free, evaluations):
    """The parameters `free` (of rotation, scale, dy, dx) of every moving image together,
    minimising the series misfit (L-BFGS-B, finite-difference gradient, at most
    `evaluations` evaluations); the others keep their start values.

    Jointly, because the images' parameters are coupled through the one exit wave (refined one
    image at a time, each settles to agree with the other's error). Parameters are scaled to
    a displacement of about a quarter pixel per unit at the field's edge; bounds: |rotation| ≤
    max_rotation_deg, |scale − 1| ≤ max_scale, shift within shift_window_px of the start. An
    image whose rotation or scale ends on its bound keeps its start values (a fallback)."""
    rotation0, scale0, shift0 = (np.array(a, float) for a in start)
    half_width = 0.5 * max(stack.shape[1:])
    unit = {"rotation": math.degrees(0.25 / half_width), "scale": 0.25 / half_width,
            "dy": 0.25, "dx": 0.25}
    max_rotation, max_scale = float(options.max_rotation_deg), float(options.max_scale)
    window = float(options.shift_window_px)
    log_bound = math.log1p(max_scale) if max_scale > 0 else 0.0
    bounds = []
    for i in moving:
        limits = {"rotation": (-max_rotation - rotation0[i], max_rotation - rotation0[i]),
                  "scale": (-log_bound - math.log(scale0[i]), log_bound - math.log(scale0[i])),
                  "dy": (-window, window), "dx": (-window, window)}
        bounds += [(limits[name][0] / unit[name], limits[name][1] / unit[name]) for name in free]

    def unpack(vector):
        rotation, scale, shift = rotation0.copy(), scale0.copy(), shift0.copy()
        for k, i in enumerate(moving):
            values = dict(zip(free, vector[k * len(free):(k + 1) * len(free)]))
            rotation[i] += values.get("rotation", 0.0) * unit["rotation"]
            scale[i] *= math.exp(values.get("scale", 0.0) * unit["scale"])
            shift[i] += (values["dy"] * unit["dy"], values["dx"] * unit["dx"])
        return rotation, scale, shift

    resampled = {i: {} for i in moving}   # per image: its last few resamplings

    def images_of(rotation, scale, shift):
        # a finite-difference step changes one image's parameters: the others are reused
        images = stack.copy()
        for i in moving:
            key = (float(rotation[i]), float(scale[i]), float(shift[i][0]), float(shift[i][1]))
            if key not in resampled[i]:
                if len(resampled[i]) >= 4:
                    resampled[i].pop(next(iter(resampled[i])))
                resampled[i][key] = undo(stack[i], key[0], key[1], key[2:])
            images[i] = resampled[i][key]
        return images

    first = misfit(images_of(rotation0, scale0, shift0))
    count = [0]

    def objective(vector):
        count[0] += 1
        return misfit(images_of(*unpack(vector))) / first

    result = optimize.minimize(objective, np.zeros(len(free) * len(moving)), method="L-BFGS-B",
                               bounds=bounds, options={"eps": 0.02, "ftol": 1e-7, "gtol": 1e-9,
                                                       "maxfun": int(evaluations)})
    rotation, scale, shift = unpack(result.x)
    fallbacks = []
    for i in moving:
        limits = []
        if "rotation" in free and max_rotation > 0 and abs(rotation[i]) >= 0.99 * max_rotation:
            limits.append(f"rotation {rotation[i]:.3f}° at its limit ±{max_rotation:g}°")
        if "scale" in free and max_scale > 0 and abs(math.log(scale[i])) >= 0.99 * log_bound:
            limits.append(f"scale {scale[i]:.4f} at its limit 1 ± {max_scale:g}")
        if limits:
            fallbacks.append(f"[{i}] refined {'; '.join(limits)}: kept its estimate before the "
                             "refinement")
            rotation[i], scale[i], shift[i] = rotation0[i], scale0[i], shift0[i]
    return {"parameters": (rotation, scale, shift), "images": images_of(rotation, scale, shift),
            "fallbacks": fallbacks, "evaluations": count[0], "count": len(free) * len(moving),
            "start": first, "end": first * float(result.fun)}


def warm_started_misfit(backend, series, images, settings, warm_sweeps, sweeps):
    """The refinement's misfit: amplitude misfit per pixel after `sweeps` GS–Misell sweeps
    started from one wave — that of `images` (the series as registered) after the TIE and
    `warm_sweeps` sweeps — instead of from each series' own TIE. A few sweeps from the TIE are
    far from converged and their misfit ranks misalignments by how fast the TIE start
    converges, not by consistency: on the 40 nm sphere (issue 19) the misfit after 5 sweeps from
    the TIE was lower for magnifications 0.0004 off the true ones than for the true ones, while
    after 20 it was higher; from the registered series' converged wave 5 sweeps rank them as 20
    do, at a quarter of the cost and without a TIE per evaluation."""
    xp = backend.xp
    start = retrieve_phase(backend, series, images, _gs_misell_settings(settings, warm_sweeps),
                           _NullArchive())
    transfers = series.transfer_functions(backend, images.shape[1:])
    phase = xp.asarray(start["phase"], dtype=backend.real_dtype)
    log_amplitude = xp.log(xp.maximum(xp.asarray(start["amplitude"], dtype=backend.real_dtype),
                                      1e-12))

    def misfit(candidate):
        amplitudes = [xp.sqrt(xp.maximum(xp.asarray(image, dtype=backend.real_dtype), 0.0))
                      for image in candidate]
        return tie_solvers.refine_gs_misell(backend, phase, log_amplitude, transfers, amplitudes,
                                            max(1, sweeps))[2]

    return misfit


def series_misfit(backend, series, images, settings, archive, sweeps):
    """Amplitude misfit per pixel of the series after the TIE and `sweeps` GS–Misell sweeps."""
    return retrieve_phase(backend, series, images, _gs_misell_settings(settings, sweeps),
                          _QuietArchive(archive))["misfit"]


def _gs_misell_settings(settings, sweeps):
    """The run's TIE settings with a refinement of `sweeps` GS–Misell sweeps (≥ 1)."""
    return SimpleNamespace(tie=settings.tie, refinement=SimpleNamespace(
        method="gs_misell", iterations=max(1, sweeps), fit_amplitude=True))


# ---------------------------------------------------------------------------------------------
# 3–5. TIE and refinement
# ---------------------------------------------------------------------------------------------

def retrieve_phase(backend, series, images, settings, archive, label="series"):
    """Plain TIE phase, refined phase and amplitude of one focal series (images on the host)."""
    xp = backend.xp
    options, log = settings.tie, archive.log
    shape = images.shape[1:]
    wavelength_m = electron_wavelength_A(series.accelerating_voltage_kV) * 1e-10
    wavenumber = 2 * math.pi / wavelength_m
    pixel_size_m = series.pixel_size_m

    if options.derivative_order is not None and int(options.derivative_order) >= len(images):
        raise InputError(f"tie.derivative_order {options.derivative_order} needs more than "
                         f"{options.derivative_order} images; the series has {len(images)}",
                         file=series.path, key="tie.derivative_order")
    boundary = tie_solvers.Boundary(xp, options.boundary, shape, float(options.pad_fraction))
    stack = xp.asarray(images, dtype=backend.real_dtype)
    extended = xp.stack([boundary.extend(image) for image in stack])
    field_of_view_m = max(shape) * pixel_size_m
    q_max = (None if options.q_max_fraction is None
             else float(options.q_max_fraction) * 0.5 / pixel_size_m)
    operators = tie_solvers.FourierOperators(backend, extended.shape[1:], pixel_size_m,
                                             q_c=float(options.tikhonov_qc) / field_of_view_m,
                                             q_max=q_max)
    derivative, fitted_in_focus = (a.astype(backend.real_dtype) for a in
                                   tie_solvers.intensity_derivative(xp, extended, series.defocus_m,
                                                                    options.derivative_order))

    def solve(in_focus):
        if options.method == "uniform":
            return tie_solvers.solve_tie_uniform(operators, derivative, wavenumber,
                                                 float(in_focus.mean()))
        return tie_solvers.solve_tie_full(operators, derivative, wavenumber, in_focus,
                                          float(options.epsilon))

    source = options.in_focus_intensity
    if source == "auto":
        source = "image" if series.has_in_focus_image else "corrected_fit"
    if source == "image":
        if not series.has_in_focus_image:
            raise InputError("tie.in_focus_intensity is 'image' but no image has defocus 0",
                             file=series.path, key="tie.in_focus_intensity")
        in_focus = extended[int(np.flatnonzero(series.defocus_m == 0.0)[0])]
        description = "in-focus image"
    elif source == "uniform":
        in_focus = xp.full_like(fitted_in_focus, float(fitted_in_focus.mean()))
        description = "uniform: mean intensity (no in-focus image used)"
    else:
        in_focus = xp.maximum(fitted_in_focus, 0.0)
        description = ("fit at Δf = 0 of the defocused images" + (" = (I₊+I₋)/2" if len(images) == 2
                                                                  else ""))
        if source == "corrected_fit":
            in_focus = corrected_in_focus_intensity(backend, series, extended.shape[1:], in_focus,
                                                    solve(in_focus), options.derivative_order)
            description += ", corrected for its Δf² bias with the forward model"
    if not series.has_in_focus_image:
        log.warning("%s: no in-focus image; the TIE uses as in-focus intensity the %s", label,
                    description)
    phase_tie = boundary.crop(solve(in_focus))
    in_focus_intensity = boundary.crop(in_focus)

    # 5. refinement with the exact forward model on the original (periodic) grid
    refinement = settings.refinement
    transfers = series.transfer_functions(backend, shape)
    amplitudes = [xp.sqrt(xp.maximum(image, 0.0)) for image in stack]
    log_amplitude = 0.5 * xp.log(xp.maximum(in_focus_intensity,
                                            1e-3 * float(in_focus_intensity.mean())))
    log_amplitude = log_amplitude.astype(backend.real_dtype)
    phase, amplitude, loss = phase_tie, xp.exp(log_amplitude), float("nan")
    if refinement.method != "none" and int(refinement.iterations) > 0:
        bar = archive.progress(total=int(refinement.iterations), desc=f"{refinement.method} ({label})")

        def on_iteration(iteration, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3e}")

        start = phase_tie.astype(backend.real_dtype)
        blurs = None
        if refinement.method == "near_field":
            alpha = float(refinement.get("alpha_near_field") or 0.0)
            blurs = tie_solvers.coherence_blurs(backend, shape, pixel_size_m, series.defocus_m, alpha)
            if refinement.start == "flat":
                # as PyPty's near-field mode starts: a flat wave of the series' mean amplitude
                start = xp.zeros(shape, dtype=backend.real_dtype)
                mean_amplitude = float(xp.mean(xp.stack(amplitudes)))
                log_amplitude = xp.full(shape, math.log(max(mean_amplitude, 1e-12)),
                                        dtype=backend.real_dtype)
            log.info("%s: near-field fit of all %d images from the %s start, flux-preserving "
                     "coherence blur α = %.3g rad", label, len(transfers),
                     "flat" if refinement.start == "flat" else "TIE", alpha)
        if refinement.method == "gs_misell":
            phase, log_amp, loss = tie_solvers.refine_gs_misell(
                backend, start, log_amplitude, transfers, amplitudes, int(refinement.iterations),
                on_iteration)
        else:
            phase, log_amp, loss = tie_solvers.refine_least_squares(
                backend, start, log_amplitude, transfers, amplitudes, int(refinement.iterations),
                bool(refinement.fit_amplitude), on_iteration, blurs=blurs)
        bar.close()
        amplitude = xp.exp(log_amp)
        log.info("%s: %s refinement, %d iterations, amplitude misfit per pixel %.3e", label,
                 refinement.method, int(refinement.iterations), loss)
    return {"phase_tie": backend.asnumpy(phase_tie), "phase": backend.asnumpy(phase),
            "amplitude": backend.asnumpy(amplitude),
            "in_focus_intensity": backend.asnumpy(in_focus_intensity),
            "in_focus_intensity_source": description, "misfit": loss}


def corrected_in_focus_intensity(backend, series, shape, fitted, phase, order=None):
    """Fit at Δf = 0 minus its bias: the same fit applied to the forward model of
    ψ = √I_fit exp(iφ_TIE), less |ψ|². One step; it removes the Δf² term of the average."""
    xp = backend.xp
    wave = (xp.sqrt(fitted) * xp.exp(1j * phase)).astype(backend.complex_dtype)
    transfers = series.transfer_functions(backend, shape)
    modelled = focal_series.focal_series_images(backend, wave, transfers)
    _, modelled_fit = tie_solvers.intensity_derivative(xp, modelled, series.defocus_m,
                                                       order)
    floor = 1e-3 * float(fitted.mean())
    return xp.maximum(fitted - (modelled_fit - xp.abs(wave) ** 2), floor)


# ---------------------------------------------------------------------------------------------
# Optional learned correction (extra `ml`)
# ---------------------------------------------------------------------------------------------

def learned_correction(backend, series, result, settings, archive):
    """Train (on simulated pairs with this series' optics) or load the network; apply it to the
    TIE phase. Returns the corrected phase and, after training, the held-out rms errors."""
    from xpr.em.tie import learned as tie_learned

    options = settings.learned_correction
    radius = float(settings.evaluation.window_radius_fraction)
    held_out = {}
    if options.train:
        training = options.training
        without_refinement = tie_learned.no_refinement(settings)
        quiet = _QuietArchive(archive)

        def retrieve(small, images):
            return retrieve_phase(backend, small, images, without_refinement, quiet, label="pair")

        rng = np.random.default_rng(int(training.seed))
        pairs = tie_learned.simulated_pairs(series, settings, retrieve,
                                            int(training.pairs) + int(training.held_out), rng,
                                            archive.log)
        network = tie_learned.train(pairs[:int(training.pairs)], training, int(training.seed),
                                    archive.log)
        without, with_correction = tie_learned.held_out_errors(network, pairs[int(training.pairs):],
                                                               radius)
        archive.log.info("learned correction, %d held-out pairs: rms %.4f rad without, %.4f rad "
                         "with", int(training.held_out), without, with_correction)
        held_out = {"learned_held_out_without_rad": without,
                    "learned_held_out_with_rad": with_correction}
        in_channels = pairs[0][0].shape[0]
        tie_learned.save(network, archive.file("learned_correction.pt"), training, options.inputs,
                         in_channels)
        inputs = options.inputs
    else:
        network, inputs, in_channels = tie_learned.load(options.model)
    network_input = tie_learned.network_inputs(inputs, result["phase_tie"], series.images,
                                               result["in_focus_intensity"])
    if network_input.shape[0] != in_channels:
        raise InputError(f"the model expects {in_channels} input channels ({inputs}), this series "
                         f"gives {network_input.shape[0]}: train it on series of "
                         f"{len(series.images)} images", file=options.model,
                         key="learned_correction.model")
    return tie_learned.correct(network, network_input, result["phase_tie"]), held_out


class _QuietArchive:
    """The run's archive for the training retrievals: warnings about the training pairs' own
    in-focus intensity are not the data's and stay out of the log."""

    def __init__(self, archive):
        self.log = _NullLog()
        self.progress = archive.progress


class _NullArchive:
    """An archive for retrievals inside a registration: nothing logged, no progress bars."""

    def __init__(self):
        self.log = _NullLog()

    @staticmethod
    def progress(**kwargs):
        return _NullBar()


class _NullBar:
    def update(self, *args):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


class _NullLog:
    def info(self, *args, **kwargs):
        pass

    warning = info


# ---------------------------------------------------------------------------------------------
# Input check: the sign of the defocus
# ---------------------------------------------------------------------------------------------

def check_defocus_sign(phase, in_focus_intensity, series, log, smoothing_px=2.0):
    """Thicker specimen regions both absorb more and shift the phase more (V_r > 0): the phase
    correlates with −ln I_in-focus. With the opposite defocus convention the retrieved phase
    is −φ and the correlation is negative."""
    absorption = -np.log(np.maximum(in_focus_intensity, 1e-6 * in_focus_intensity.mean())
                         / in_focus_intensity.mean())
    absorption = ndimage.gaussian_filter(absorption, smoothing_px)
    smooth_phase = ndimage.gaussian_filter(phase, smoothing_px)
    if absorption.std() < 0.01:
        log.info("defocus sign check inconclusive: no absorption contrast (rms %.2g)",
                 absorption.std())
        return
    correlation = float(np.corrcoef(absorption.ravel(), smooth_phase.ravel())[0, 1])
    log.info("defocus sign check: correlation of phase and absorption %.2f", correlation)
    if correlation < -0.3:
        raise InputError(
            f"the retrieved phase anti-correlates with the absorption contrast ({correlation:.2f}): "
            "the defocus values look like the opposite sign convention (xpr: positive defocus "
            "means the transfer function exp(+iπλΔf|q|²)). Set imaging.defocus_sign: -1, or "
            "checks.defocus_sign: false for a specimen of negative potential",
            file=series.path, key="imaging.defocus_sign")


# ---------------------------------------------------------------------------------------------
# 7. Errors and output
# ---------------------------------------------------------------------------------------------

def error_table(outputs, truth, radius_fraction):
    """rms errors (rad) of every retrieved phase whose exact counterpart is known."""
    pairs = {"tie": ("phase_tie", "exact_phase"), "refined": ("phase", "exact_phase"),
             "electrostatic_tie": ("phase_electrostatic_tie", "exact_phase_electrostatic"),
             "electrostatic_refined": ("phase_electrostatic", "exact_phase_electrostatic"),
             "magnetic_tie": ("phase_magnetic_tie", "exact_phase_magnetic"),
             "magnetic_refined": ("phase_magnetic", "exact_phase_magnetic"),
             "learned": ("phase_learned", "exact_phase")}
    return {f"rms_{name}_rad": tie_solvers.rms_error_in_window(outputs[retrieved], truth[exact],
                                                               radius_fraction)
            for name, (retrieved, exact) in pairs.items()
            if retrieved in outputs and exact in truth}


def _as_float32(tree):
    if isinstance(tree, dict):
        return {key: _as_float32(value) for key, value in tree.items()}
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f" and tree.ndim >= 2:
        return tree.astype(np.float32)
    return tree


def phase_figure(outputs, truth):
    panels = [("phase_tie", "plain TIE (rad)"), ("phase", "refined (rad)")]
    if "phase_magnetic" in outputs:
        panels += [("phase_electrostatic", "electrostatic (rad)"), ("phase_magnetic", "magnetic (rad)")]
    if "exact_phase" in truth:
        panels.append(("error", "refined − exact (rad)"))
    fig, axes = plot.figure(1, len(panels), size=(3.4, 3.0))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        if key == "error":
            difference = outputs["phase"] - truth["exact_phase"]
            plot.image(ax, difference - difference.mean(), title, cmap="RdBu_r")
        else:
            plot.image(ax, outputs[key], title)
    return fig
