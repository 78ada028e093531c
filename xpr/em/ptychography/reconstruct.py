"""The reconstruction loop: staged refinement of object, probe, positions and defocus by L-BFGS.

One epoch is one L-BFGS iteration: a full-data gradient (patterns processed in batches:
cache-sized on a CPU, memory-sized on a GPU) plus whatever extra evaluations the Wolfe line
search needs. The variables are preconditioned by the diagonal of a Gauss–Newton curvature
estimate, so that one L-BFGS history serves every kind of unknown:

    object    D_O(r) = 1 / (Σ_j |ψ_j(r − r_j)|² + floor · max)    (the illumination, as in rPIE)
    probe     D_p    = 1 / Σ_j ⟨|O_j|²⟩                              (number of patterns)
    positions D_f    = 1 / ((1/n²) Σ_{m,k} |P_m(k)|² (2π|k|)² / 2)  (probe gradient energy)
    defocus   D_Δf   = 1 / (∂²L/∂Δf²)                                  (measured, below)
    aberrations D_C  = H⁻¹, H = ∂²L/∂δC_c∂δC_d                          (measured, below)
    scan affine D_a  = 100 / ((energy/2) Σ_j (d_j,b)²)   entry (a, b), d_j = r_j − c (AFFINE_VALLEY)

A defocus change alters only the phase inside the bright-field disc: under a featureless object
it changes no intensity at all, and under a thin specimen only through the small scattered
part that overlaps the disc. The Gauss–Newton estimate from the whole probe derivative,
N (1/n²) Σ |P(k)|² (πλ|k|²)² / 2, therefore overestimates the curvature by one to two orders of
magnitude (defocus refinement then crawls). Instead the curvature is measured where the stage
starts, by a central difference of ∂L/∂Δf over ±h (h: a quarter radian of defocus phase at the
probe's rms frequency) — two extra evaluations per stage; the Gauss–Newton value is the
fallback if the measured curvature is not positive. The further aberrations (C12a, C21b, C30,
…) are coupled (C30 with C10, C12 with C10 where the object is not round), so their whole
Hessian is measured, by forward differences of the aberration gradient (K + 1 evaluations for
K coefficients, the same quarter-radian steps); its inverse, eigenvalues floored at 10⁻³ of the
largest, preconditions their steps (the diagonal Gauss–Newton estimate if it is not usable).

Global scan distortion (refine.scan_affine). The scan positions the model uses are
r'_j = c + (I + A)(r_j − c), A a 2 × 2 matrix (4 unknowns, zero at the start; c the centre of
the initial positions): scale, shear and rotation of the whole scan, the distortion of a
miscalibrated scan generator. Its gradient is ∂L/∂A = Σ_j g_j (r_j − c)ᵀ from the position
gradients g_j; a common translation is left out (a shift of the object does the same). With free
positions refined too, they refine r_j underneath the map (∂L/∂r_j = (I + A)ᵀ g_j), and the
positions returned are the mapped ones.

Refining a new kind of unknown from a later epoch restarts the L-BFGS history.

Stopping (noise-aware). A random `validation_fraction` of the measured detector pixels of every
pattern is held out of the fit; their loss is evaluated at every accepted iterate for free (the
same forward pass). Once every unknown is being refined, the reconstruction stops when the
held-out loss has not improved for `patience` epochs and returns the iterate with the lowest
held-out loss — so more epochs never make the result worse, the model stops before it fits
the noise. `stop_at_noise_floor` adds the discrepancy principle (stop when the fitted loss
reaches its expected value for Poisson counts, losses.noise_floor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from xpr.em.ptychography import lbfgs, losses, regularisers
from xpr.options import options, setting


@options("em", "ptycho")
class Options:
    """What the optimisation does: `reconstruction.*` of settings_defaults/em/ptycho.yaml (the
    defaults are read from there), plus the constant of the method below."""

    epochs: int = setting("reconstruction.epochs")
    loss: str = setting("reconstruction.loss")
    batch_size: int = 256                      # patterns per gradient batch (set from the memory plan)
    refine_object: bool = setting("reconstruction.refine.object")
    refine_probe: bool = setting("reconstruction.refine.probe")
    refine_positions: bool = setting("reconstruction.refine.positions")
    refine_scan_affine: bool = setting("reconstruction.refine.scan_affine")
    refine_defocus: bool = setting("reconstruction.refine.defocus")
    # a tuple of Krivanek names, or "auto" (resolved by ptycho.prepare: resolve_aberrations)
    refine_aberrations: object = setting("reconstruction.refine.aberrations",
                                         lambda names: names if isinstance(names, str)
                                         else tuple(names or ()))
    probe_from_epoch: int = setting("reconstruction.refine.probe_from_epoch")
    positions_from_epoch: int = setting("reconstruction.refine.positions_from_epoch")
    scan_affine_from_epoch: int = setting("reconstruction.refine.scan_affine_from_epoch")
    defocus_from_epoch: int = setting("reconstruction.refine.defocus_from_epoch")
    aberrations_from_epoch: int = setting("reconstruction.refine.aberrations_from_epoch")
    history: int = setting("reconstruction.lbfgs.history")
    c1: float = setting("reconstruction.lbfgs.c1")
    c2: float = setting("reconstruction.lbfgs.c2")
    first_step: float = setting("reconstruction.lbfgs.first_step")
    max_line_search: int = setting("reconstruction.lbfgs.max_line_search")
    preconditioner_floor: float = setting("reconstruction.lbfgs.preconditioner_floor")
    phase_l1: float = setting("reconstruction.regularisation.phase_l1")
    total_variation: float = setting("reconstruction.regularisation.total_variation")
    regulariser_epsilon: float = setting("reconstruction.regularisation.epsilon")
    probe_window: float = setting("reconstruction.regularisation.probe_window")
    probe_window_radius: float = setting("reconstruction.regularisation.probe_window_radius")
    # "auto" (the measured detector's edge, resolved by ptycho.prepare), a frequency in Å⁻¹, or
    # None (no limit)
    object_band_limit: object = setting("reconstruction.regularisation.object_band_limit")
    stop_at_noise_floor: bool = setting("reconstruction.stop_at_noise_floor")
    noise_floor_factor: float = setting("reconstruction.noise_floor_factor")
    validation_fraction: float = setting("reconstruction.validation_fraction")
    patience: int = setting("reconstruction.patience")
    seed: int = setting("reconstruction.seed")
    relative_tolerance: float = 1e-6           # stop when the loss changes by less than this fraction


@dataclass
class History:
    epoch: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    best_epoch: int = -1


def refined_names(options: Options, epoch: int) -> tuple:
    names = []
    if options.refine_object:
        names.append("object")
    if options.refine_probe and epoch >= options.probe_from_epoch:
        names.append("probe")
    if options.refine_positions and epoch >= options.positions_from_epoch:
        names.append("positions")
    if options.refine_scan_affine and epoch >= options.scan_affine_from_epoch:
        names.append("scan_affine")
    if refines_defocus(options) and epoch >= options.defocus_from_epoch:
        names.append("defocus")
    if aberration_names(options) and epoch >= options.aberrations_from_epoch:
        names.append("aberrations")
    return tuple(names)


def mapped_positions(params):
    """The positions the model sees: c + (I + A)(r − c) with A = params["scan_affine"] (4,)
    row-major and c = params["scan_centre"]; params["positions"] itself without an affine."""
    if params.get("scan_affine") is None:
        return params["positions"]
    a = params["scan_affine"]
    d = params["positions"] - params["scan_centre"]
    mapped = params["positions"] + 0.0                          # a copy, on the same device
    mapped[:, 0] += a[0] * d[:, 0] + a[1] * d[:, 1]
    mapped[:, 1] += a[2] * d[:, 0] + a[3] * d[:, 1]
    return mapped


def affine_matrix(entries, xp):
    """I + A (2, 2) from the four entries of A, row-major."""
    return xp.eye(2, dtype=xp.float64) + xp.asarray(entries, dtype=xp.float64).reshape(2, 2)


def model_params(params):
    """params with the positions the model sees (mapped_positions)."""
    if params.get("scan_affine") is None:
        return params
    return dict(params, positions=mapped_positions(params))


# refine.aberrations: auto with one probe mode. Measured on abTEM data (docs/em_ptycho.md): MoS2
# with residual astigmatism, coma and C30, only C10 given: r 0.961 → 0.991 (0.992 with the true
# aberrations given); MoS2 0.991 → 0.992, thick SrTiO3 0.974 → 0.974 (1 slice), 0.999 → 0.999
# (4 slices), 60 Å focal spread 0.922 → 0.922. With 3 probe modes on the focal spread
# 0.942 → 0.933: the modes and the coefficients share the blur, so with modes it stays off.
AUTO_ABERRATIONS = ("C12a", "C12b", "C21a", "C21b")


def resolve_aberrations(value, modes: int) -> tuple:
    """refine.aberrations as a tuple of names: "auto" is AUTO_ABERRATIONS with one probe mode
    and none with more."""
    if isinstance(value, str):
        return AUTO_ABERRATIONS if int(modes) == 1 else ()
    return tuple(value or ())


def refines_defocus(options: Options) -> bool:
    """C10 is refined: refine.defocus, or C10 in refine.aberrations (the same unknown Δf)."""
    return bool(options.refine_defocus) or "C10" in aberration_list(options)


def aberration_list(options: Options) -> tuple:
    """refine.aberrations, "auto" not yet resolved (ptycho.prepare does) counting as none."""
    value = options.refine_aberrations
    return () if isinstance(value, str) else tuple(value)


def aberration_names(options: Options) -> tuple:
    """The Krivanek coefficients refined as params["aberrations"] (refine.aberrations less
    C10, which is the defocus unknown)."""
    return tuple(name for name in aberration_list(options) if name != "C10")


def aberration_steps(model, params):
    """Per coefficient, the change (Å) that moves the phase by a quarter radian where the probe
    has its power: 0.25 / Σ|P|²|B_c| / Σ|P|² (for C10 this is the defocus step)."""
    xp = model.backend.xp
    power = xp.sum(xp.abs(model.fft2(params["probe"])) ** 2, axis=0)
    weights = xp.sum(xp.abs(model.aberration_basis()) * power[None], axis=(1, 2)) / xp.sum(power)
    return [0.25 / max(float(w), 1e-12) for w in model.backend.asnumpy(weights)]


def aberration_hessian(model, params, aberration_gradient):
    """Symmetrised forward-difference Hessian (K, K) of the loss in the aberration changes, and
    the steps (Å) it took; aberration_gradient(p) returns ∂L/∂δC (K,) at the parameters p (host
    numpy)."""
    import numpy as np

    steps = aberration_steps(model, params)
    base = np.asarray(aberration_gradient(params), dtype=np.float64)
    columns = []
    for index, step in enumerate(steps):
        shifted = dict(params)
        changes = np.array(model.backend.asnumpy(params["aberrations"]), dtype=np.float64)
        changes[index] += step
        shifted["aberrations"] = model.backend.xp.asarray(changes)
        columns.append((np.asarray(aberration_gradient(shifted)) - base) / step)
    hessian = np.stack(columns, axis=1)
    return 0.5 * (hessian + hessian.T), steps


def inverse_hessian_operator(hessian, steps, xp, floor: float = 1e-3):
    """g ↦ H⁻¹g, H's eigenvalues floored at `floor` × the largest in units of the steps (the
    coefficients' units differ by orders of magnitude: 1 Å of C30 moves the phase 10⁴ times
    less than 1 Å of C12); None when H has no positive eigenvalue."""
    import numpy as np

    scale = np.asarray(steps, dtype=np.float64)
    values, vectors = np.linalg.eigh(hessian * scale[:, None] * scale[None, :])
    if not np.isfinite(values).all() or values.max() <= 0:
        return None
    values = np.maximum(values, floor * values.max())
    inverse = xp.asarray(scale[:, None] * ((vectors / values) @ vectors.T) * scale[None, :])
    return lambda g: inverse @ g


def defocus_curvature(model, params, defocus_gradient):
    """(∂L/∂Δf(Δf + h) − ∂L/∂Δf(Δf − h)) / 2h, or None when not positive; defocus_gradient(p)
    returns ∂L/∂Δf at the parameters p."""
    xp = model.backend.xp
    power = xp.abs(model.fft2(params["probe"])) ** 2
    k2_rms = float(xp.sum(power * model.squared_frequencies_invA()) / xp.sum(power))
    step = 0.25 / (math.pi * model.wavelength_A * max(k2_rms, 1e-12))
    slopes = []
    for sign in (1.0, -1.0):
        shifted = dict(params)
        shifted["defocus"] = params["defocus"] + sign * step
        slopes.append(defocus_gradient(shifted))
    curvature = (slopes[0] - slopes[1]) / (2.0 * step)
    return curvature if curvature > 0 else None


# The scan affine's Gauss–Newton curvature holds the object fixed; but an object warped with the
# positions explains the data almost as well (only the patterns' stretch and the probe's shape
# tell them apart), so along that valley the curvature is far lower and steps of the Gauss–Newton
# size crawl. Measured on a 12² scan told a 5 % distortion (tests/em/test_ptycho.py), distortion
# left after 40 epochs with the preconditioner × 1: 3.7 %, × 10: 1.30 %, × 100: 1.25 %,
# × 1000: 1.32 %.
AFFINE_VALLEY = 100.0

ILLUMINATION_CHUNK = 256          # scan points whose probe intensities are added at once


def object_band(model, object_shape, k_max_invA):
    """P(a): the object slices' spectra cut to |k| ≤ k_max (Å⁻¹), a projection (self-adjoint,
    idempotent); None when the cut lies beyond the grid's every frequency (nothing to cut)."""
    if k_max_invA is None:
        return None
    xp = model.backend.xp
    ky = xp.fft.fftfreq(object_shape[-2], model.pixel_size_A)[:, None]
    kx = xp.fft.fftfreq(object_shape[-1], model.pixel_size_A)[None, :]
    keep = (ky ** 2 + kx ** 2) <= float(k_max_invA) ** 2
    if bool(xp.all(keep)):
        return None
    keep = keep.astype(model.real_dtype)

    def project(a):
        return model.backend.ifftn(model.backend.fftn(a, axes=(-2, -1)) * keep,
                                   axes=(-2, -1)).astype(a.dtype)

    return project


def preconditioner(model, params, names, options: Options, defocus_gradient=None,
                   band=None, aberration_gradient=None) -> dict:
    """Diagonal scalings per unknown (arrays or scalars); with a band limit the object's is the
    operator g ↦ P(D_O · g) (P: object_band), so every step stays band-limited."""
    xp = model.backend.xp
    probe = params["probe"]
    n = model.window
    result = {}
    if "object" in names:
        corners, _ = model.split_positions(mapped_positions(params))
        illumination = xp.zeros(params["object"].shape[-2:], dtype=xp.float32)
        probe_intensity = xp.sum(xp.abs(probe) ** 2, axis=0).astype(xp.float32)
        # in chunks: the index arrays of all windows at once are 2 × the float32 counts (a
        # streamed scan's 0.27 GB made a 0.7 GB peak); added in the same order, same sums
        chunk = ILLUMINATION_CHUNK
        for start in range(0, len(corners), chunk):
            part = corners[start:start + chunk]
            model.scatter_add(illumination, xp.broadcast_to(probe_intensity, (len(part), n, n)),
                              part)
        floor = options.preconditioner_floor * float(illumination.max())
        result["object"] = (1.0 / (illumination + floor))[None].astype(xp.float32)
        if band is not None:
            diagonal = result["object"]
            result["object"] = lambda g: band(diagonal * g)
    if "probe" in names:
        result["probe"] = 1.0 / params["positions"].shape[0]
    if "positions" in names or "scan_affine" in names:
        k = model.frequencies
        k2 = (k[:, None] ** 2 + k[None, :] ** 2)
        energy = float(xp.sum(xp.abs(model.fft2(probe)) ** 2 * k2)) * (2 * math.pi) ** 2 / n ** 2
        result["positions"] = 2.0 / energy
    if "scan_affine" in names:
        import numpy as np

        offsets = np.asarray(model.backend.asnumpy(params["positions"] - params["scan_centre"]))
        spread = np.sum(offsets ** 2, axis=0)                    # Σ_j d_j,b² for b = y, x
        result["scan_affine"] = xp.asarray(AFFINE_VALLEY * np.tile(
            2.0 / (energy * np.maximum(spread, 1e-12)), 2))
    if "positions" not in names:
        result.pop("positions", None)
    if "defocus" in names:
        probe_k = model.fft2(probe)
        if params.get("defocus") is not None:
            probe_k = probe_k * model.defocus_factor(params["defocus"])
        k4 = model.squared_frequencies_invA() ** 2
        energy = float(xp.sum(xp.abs(probe_k) ** 2 * k4)) * (math.pi * model.wavelength_A) ** 2 \
            / n ** 2 * params["positions"].shape[0]
        result["defocus"] = 2.0 / energy
        measured = None if defocus_gradient is None else \
            defocus_curvature(model, params, defocus_gradient)
        if measured is not None:
            result["defocus"] = 1.0 / measured
    if "aberrations" in names:
        factor = model.probe_factor(params)
        probe_k = model.fft2(probe) if factor is None else model.fft2(probe) * factor
        power = xp.sum(xp.abs(probe_k) ** 2, axis=0)
        energy = xp.sum(model.aberration_basis() ** 2 * power[None], axis=(1, 2)) / n ** 2 \
            * params["positions"].shape[0]
        result["aberrations"] = 2.0 / xp.maximum(energy, 1e-30)
        if aberration_gradient is not None:
            operator = inverse_hessian_operator(
                *aberration_hessian(model, params, aberration_gradient), xp)
            if operator is not None:
                result["aberrations"] = operator
    return result


def objective(model, counts, fixed: dict, names: tuple, options: Options, mask=None, band=None):
    """evaluate(x) -> (loss, gradients) for the refined arrays x, the rest held at `fixed`;
    `band` (object_band) projects the object gradient onto the band-limited objects."""
    xp = model.backend.xp

    wanted = set(names) - {"scan_affine"}
    if "scan_affine" in names:
        wanted.add("positions")

    def evaluate(x):
        params = dict(fixed)
        params.update(x)
        value, gradients, validation = model.loss_and_gradients(
            model_params(params), counts, options.loss, wanted, options.batch_size, mask,
            with_validation=True)
        if params.get("scan_affine") is not None and "positions" in gradients:
            mapped = gradients.pop("positions")                    # ∂L/∂r'_j
            if "scan_affine" in names:
                offsets = params["positions"] - params["scan_centre"]
                gradients["scan_affine"] = (mapped.T @ offsets).reshape(-1)
            if "positions" in names:
                gradients["positions"] = mapped @ affine_matrix(params["scan_affine"], xp)
        if "object" in names and options.phase_l1 > 0:
            v, g = regularisers.phase_l1(params["object"], options.phase_l1,
                                         options.regulariser_epsilon, xp)
            value, gradients["object"] = value + v, gradients["object"] + g
        if "object" in names and options.total_variation > 0:
            v, g = regularisers.total_variation(params["object"], options.total_variation,
                                                options.regulariser_epsilon, xp)
            value, gradients["object"] = value + v, gradients["object"] + g
        if "probe" in names and options.probe_window > 0:
            v, g = regularisers.probe_window(params["probe"], options.probe_window,
                                             options.probe_window_radius, xp)
            value, gradients["probe"] = value + v, gradients["probe"] + g
        if "object" in names and band is not None:
            gradients["object"] = band(gradients["object"])
        return value, gradients, validation

    return evaluate


def defocus_slope(model, measured, params, options: Options) -> float:
    """∂L/∂Δf of the data term at params."""
    _, gradients = model.loss_and_gradients(model_params(params), measured, options.loss,
                                            {"defocus"},
                                            options.batch_size)
    return float(model.backend.asnumpy(gradients["defocus"])[0])


def aberration_slopes(model, measured, params, options: Options):
    """∂L/∂δC (K,) of the data term at params, on the host."""
    import numpy as np

    _, gradients = model.loss_and_gradients(model_params(params), measured, options.loss,
                                            {"aberrations"},
                                            options.batch_size)
    return np.asarray(model.backend.asnumpy(gradients["aberrations"]), dtype=np.float64)


def held_out_pixels(shape, fraction: float, seed: int, xp):
    """(N, n, n) bool, True on a random `fraction` of the pixels of each pattern."""
    if fraction <= 0:
        return None
    import numpy as np

    chosen = np.random.default_rng(seed).random(shape) < fraction
    return xp.asarray(chosen)


def reconstruct(model, counts, params: dict, options: Options, mask=None, start_epoch: int = 0,
                history: History | None = None, on_epoch=None, log=None, progress=None):
    """Refine a copy of params; returns (params with the lowest held-out loss, history).

    on_epoch(epoch, params, history) is called after every epoch (checkpoints, CSV log).
    """
    import time

    xp = model.backend.xp
    history = history or History()
    params = dict(params)
    if refines_defocus(options) and params.get("defocus") is None:
        params["defocus"] = xp.zeros(1, dtype=xp.float64)          # Δf starts at 0
    if options.refine_scan_affine and params.get("scan_affine") is None:
        params["scan_affine"] = xp.zeros(4, dtype=xp.float64)          # A starts at 0
    if params.get("scan_affine") is not None and params.get("scan_centre") is None:
        params["scan_centre"] = xp.mean(params["positions"], axis=0)
    extra = aberration_names(options)
    if tuple(model.aberration_names) != extra:
        import dataclasses

        model = dataclasses.replace(model, aberration_names=extra)
    if extra and (params.get("aberrations") is None or len(params["aberrations"]) != len(extra)):
        params["aberrations"] = xp.zeros(len(extra), dtype=xp.float64)   # δC start at 0
    mean = losses.mean_pattern(counts, xp)
    floor = losses.noise_floor(counts, options.loss, xp, mask, mean) * options.noise_floor_factor
    if hasattr(counts, "blocks") and options.validation_fraction > 0:     # streamed counts
        from xpr.em.ptychography.streaming import PackedHoldout

        holdout = PackedHoldout(counts.shape, options.validation_fraction, options.seed, xp)
    else:
        holdout = held_out_pixels(counts.shape, options.validation_fraction, options.seed, xp)
    if holdout is not None:
        floor *= 1.0 - options.validation_fraction
    measured = losses.Measurements(counts, mask, holdout, losses.ml_epsilon(mean, mask))
    band = object_band(model, params["object"].shape, options.object_band_limit) \
        if options.refine_object and not isinstance(options.object_band_limit, str) else None
    if band is not None:                      # e.g. a checkpoint's object: start inside the band
        params["object"] = band(params["object"])
    final_names = refined_names(options, max(options.epochs - 1, 0))
    optimiser, names = None, None
    best = (math.inf, None)
    stale = 0
    clock = time.perf_counter()
    epochs = range(start_epoch, options.epochs)
    for epoch in (progress(epochs, desc="ptycho") if progress else epochs):
        wanted = refined_names(options, epoch)
        if wanted != names:
            if optimiser is not None:
                params.update(optimiser.x)
            names = wanted
            fixed = {key: value for key, value in params.items() if key not in names}
            optimiser = lbfgs.LBFGS(
                objective(model, measured, fixed, names, options, band=band),
                {k: params[k] for k in names},
                xp, preconditioner(model, params, names, options,
                                   lambda p: defocus_slope(model, measured, p, options), band,
                                   lambda p: aberration_slopes(model, measured, p, options)),
                history=options.history,
                c1=options.c1, c2=options.c2, first_step=options.first_step,
                max_evaluations=options.max_line_search)
        before = optimiser.f
        moved = optimiser.step()
        params.update(optimiser.x)
        if "positions" in names:
            params["positions"] = clamp_positions(model, params["positions"],
                                                  params["object"].shape[-2:])
            optimiser.x["positions"] = params["positions"]
        if "scan_affine" in names:
            params["scan_affine"] = clamp_affine(model, params, params["object"].shape[-2:])
            optimiser.x["scan_affine"] = params["scan_affine"]
        history.epoch.append(epoch)
        history.loss.append(optimiser.f)
        history.validation.append(optimiser.info if holdout is not None else math.nan)
        history.evaluations.append(optimiser.evaluations)
        history.seconds.append(time.perf_counter() - clock)
        if log is not None:
            log.debug("epoch %d loss %.6g held-out %.6g evaluations %d", epoch, optimiser.f,
                      history.validation[-1], optimiser.evaluations)
        final_stage = names == final_names
        if holdout is not None:
            if optimiser.info < best[0] or not final_stage:
                best = (optimiser.info, {key: value.copy() for key, value in params.items()})
                history.best_epoch = epoch
                stale = 0
            else:
                stale += 1
        if on_epoch is not None:
            on_epoch(epoch, params, history)
        if holdout is not None and stale >= options.patience:
            if log is not None:
                log.info("held-out loss lowest at epoch %d, none lower in %d epochs: stopping",
                         history.best_epoch, options.patience)
            break
        if options.stop_at_noise_floor and final_stage and optimiser.f <= floor:
            if log is not None:
                log.info("loss %.6g reached the noise floor %.6g at epoch %d: stopping",
                         optimiser.f, floor, epoch)
            break
        if not moved or abs(before - optimiser.f) <= options.relative_tolerance * abs(before):
            if final_stage:
                if log is not None:
                    log.info("no further decrease at epoch %d: stopping", epoch)
                break
    if best[1] is not None:
        params = best[1]
    if params.get("scan_affine") is not None:          # the positions the model saw
        params["positions"] = mapped_positions(params)
    return params, history


def clamp_affine(model, params, object_shape):
    """The affine entries scaled back towards 0 until every mapped window lies inside the
    object array (the map's gradient is not defined beyond it)."""
    xp = model.backend.xp
    entries = params["scan_affine"]
    for _ in range(30):
        mapped = mapped_positions(dict(params, scan_affine=entries))
        if bool(xp.all(clamp_positions(model, mapped, object_shape) == mapped)):
            return entries
        entries = entries * 0.5
    return xp.zeros_like(entries)


def clamp_positions(model, positions, object_shape):
    """Keep every window inside the object array."""
    xp = model.backend.xp
    upper = xp.asarray([object_shape[0] - model.window - 0.5, object_shape[1] - model.window - 0.5])
    return xp.clip(positions, 0.0, upper)
