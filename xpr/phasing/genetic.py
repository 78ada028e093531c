"""Guided repeats: a genetic algorithm over generations of the batch of repeats (after cohere's GA).

Independent repeats from random starts end in different local optima; most are close to the
object in some regions and wrong in others. A genetic algorithm (Chen et al. 2007, "guided
hybrid input-output"; cohere's `ga_*` options) lets them share what they got right:

    generation 0:  every repeat runs the schedule from its own random start
    after each generation g (but the last):
      1. rank    the repeats by a score, lower = better: the free Poisson deviance on pixels held
                 out of the fit (xpr.phasing.likelihood; it measures the object, not how closely
                 the fitted pixels were matched), or the final eMod on the fitted pixels;
      2. cull    drop the `cull` worst repeats (at least two stay);
      3. alpha   the best repeat so far (this generation's best, or an earlier one that scored
                 better on the same data);
      4. breed   every surviving repeat b with the alpha a. The alpha is first moved into b's
                 frame -- translation, centrosymmetric twin conj(a(-r)) and global phase removed
                 against b (xpr.phasing.merge.align) -- so that the two describe the object in the
                 same frame, then combined pixel by pixel:
                   sqrt_ab  |child| = sqrt(|a| |b|) and its phase halfway between b's and a's
                            (along the shorter arc: arg b + arg(a b*)/2), the geometric mean;
                   avg_ab   child = (a + b) / 2, the arithmetic mean;
                   none     child = b (culling and restarts only: a control);
      5. support the child's support is the shrink-wrap of the whole child (blurred amplitude
                 thresholded and confined as during the run);
    generation g+1: every child runs the schedule again from its bred object and support.

The geometric mean keeps only what both parents hold (zero where either is zero), so spurious
density of one repeat outside the other's object is removed; the phase midpoint is the mean of
two unit phasors renormalised. Breeding with itself returns a repeat unchanged.

Optional resolution ramp (cohere's low-pass filter over the first generations): in generation g
the measured intensities are multiplied by exp(-q^2 / sigma_g^2), i.e. the moduli by the Gaussian
exp(-q^2 / (2 sigma_g^2)), sigma_g a fraction of the Nyquist frequency (0.5 cycles/px). Fitting
these moduli recovers the object convolved with the matching real-space Gaussian -- a smooth,
easier problem -- whose result seeds the next generation at a finer resolution.

The population is the batch: repeats stay along the leading axis of one array, and each
generation's iterations run batched (and split over processes) as a run without generations does.
Everything here uses the backend's array module (xpr.backend).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpr.phasing.merge import align
from xpr.phasing.projections import squared_frequency

BREEDS = ("avg_ab", "sqrt_ab", "none")
METRICS = ("free_deviance", "e_mod")


@dataclass(frozen=True)
class Plan:
    """How the generations run.

    generations: number of generations (1 = no genetic algorithm, a plain run);
    breed: one of BREEDS; metric: one of METRICS (lower = better);
    cull: repeats dropped after each generation, a number or one per generation transition;
    resolution: low-pass widths (fraction of Nyquist) of the first generations; later ones use
    the full data.
    """

    generations: int = 1
    breed: str = "avg_ab"
    metric: str = "free_deviance"
    cull: int | tuple = 0
    resolution: tuple = ()

    def __post_init__(self):
        if self.breed not in BREEDS:
            raise ValueError(f"unknown breeding mode {self.breed!r} (known: {', '.join(BREEDS)})")
        if self.metric not in METRICS:
            raise ValueError(f"unknown ranking metric {self.metric!r} (known: {', '.join(METRICS)})")

    def culled_after(self, generation: int) -> int:
        """Number of the worst repeats the plan drops after `generation` (0-based)."""
        if isinstance(self.cull, (list, tuple)):
            return int(self.cull[generation]) if generation < len(self.cull) else 0
        return int(self.cull)

    def survivors(self, generation: int, alive: int) -> int:
        """Repeats kept after `generation` when `alive` finished it (at least two, if there were)."""
        return max(min(alive, 2), alive - self.culled_after(generation))

    def low_pass(self, generation: int) -> float | None:
        """The Gaussian width (fraction of Nyquist) of the data filter in `generation`, or None."""
        widths = tuple(self.resolution or ())
        return float(widths[generation]) if generation < len(widths) else None


def ga_generations(settings) -> int:
    """ga.generations: 1 (a plain run) where the settings have no `ga` block."""
    return int((settings.get("ga") or {}).get("generations", 1))


def scores(result: dict, metric: str) -> np.ndarray:
    """Per repeat score of a generation's result (lower = better)."""
    if metric == "free_deviance" and "free_deviance" in result:
        return np.asarray(result["free_deviance"], dtype=float)
    return np.asarray(result["e_mod"], dtype=float)[:, -1]


def cross(a, b, mode: str, xp=np):
    """The child of two objects in the same frame (see the module docstring for the modes)."""
    if mode == "none":
        return b.copy()
    if mode == "avg_ab":
        return 0.5 * (a + b)
    amplitude = xp.sqrt(xp.abs(a) * xp.abs(b))
    phase = xp.angle(b) + 0.5 * xp.angle(a * xp.conj(b))
    return (amplitude * xp.exp(1j * phase)).astype(b.dtype)


def breed(objects, alpha, mode: str, backend, allow_twin=True):
    """Children of every repeat of the batch `objects` (repeats, *grid) with `alpha` (*grid):
    the alpha moved into each repeat's frame (shift, twin, global phase), then `cross`."""
    xp = backend.xp
    objects = xp.asarray(objects).astype(backend.complex_dtype)
    children = xp.empty_like(objects)
    alpha = xp.asarray(alpha).astype(backend.complex_dtype)
    for i in range(objects.shape[0]):
        b = objects[i]
        if mode == "none":
            children[i] = b
            continue
        moved, _ = align(b, alpha, backend, allow_twin=allow_twin)
        children[i] = cross(moved, b, mode, xp)
    return children


def low_pass_weight(shape, width: float) -> np.ndarray:
    """exp(-q^2 / width^2) in FFT order, q in cycles/px and width a fraction of Nyquist (0.5):
    the factor on the intensities (its square root, on the moduli, is a Gaussian of std width)."""
    q2 = squared_frequency(shape)
    sigma = 0.5 * float(width)
    return np.exp(-q2 / (sigma * sigma))


def evolve(run_generation, seeds, plan: Plan, backend, shrink_wrap, log=None, allow_twin=True):
    """Run the generations; returns the last generation's result.

    run_generation(g, seeds, start) phases the repeats `seeds` for generation g (start None: from
    their random starts; else {"object", "support"}: one row per seed, the bred starts) and returns
    a dict of numpy arrays with one row per phased repeat: object, support, e_mod, seed (and
    free_deviance when held-out pixels exist), as xpr.cdi.phasing.phase_repeats.
    shrink_wrap(x, support) -> the children's supports (xpr.phasing.shrinkwrap.ShrinkWrap).
    The last result also holds `generation_scores`: (generations, initial repeats), NaN where a
    repeat was culled or failed, rows in the order of the initial seeds.
    """
    xp = backend.xp
    first_seeds = [int(s) for s in seeds]
    history = np.full((plan.generations, len(first_seeds)), np.nan, dtype=np.float32)
    start, alpha, failed = None, None, []
    for g in range(plan.generations):
        result = run_generation(g, list(seeds), start)
        failed.extend(int(s) for s in np.asarray(result.get("failed_seeds", []), dtype=np.uint64))
        score = scores(result, plan.metric)
        row_seeds = [int(s) for s in result["seed"]]
        for s, value in zip(row_seeds, score):
            history[g, first_seeds.index(s)] = value
        if log is not None:
            log.info("generation %d of %d: %s per repeat %s", g + 1, plan.generations, plan.metric,
                     np.array2string(score, precision=4))
        if g == plan.generations - 1:
            break
        order = np.argsort(score, kind="stable")
        best = int(order[0])
        same_data = alpha is not None and plan.low_pass(g) == alpha["low_pass"]
        if alpha is None or not same_data or score[best] < alpha["score"]:
            alpha = {"object": result["object"][best], "score": float(score[best]),
                     "low_pass": plan.low_pass(g), "generation": g, "seed": row_seeds[best],
                     "row": {key: result[key][best] for key in PER_REPEAT
                             if key in result and len(result[key]) == len(row_seeds)}}
        keep = np.sort(order[:plan.survivors(g, len(order))])
        children = breed(result["object"][keep], alpha["object"], plan.breed, backend,
                         allow_twin=allow_twin)
        # the child's own support: all of it is looked at (an arithmetic-mean child also holds
        # density of the alpha outside the repeat's old support), confined as the run's updates
        supports = shrink_wrap(children, xp.ones(children.shape, dtype=bool))
        start = {"object": backend.asnumpy(children), "support": backend.asnumpy(supports)}
        seeds = [row_seeds[i] for i in keep]
        if log is not None:
            log.info("generation %d: alpha scores %.4f; %d repeats kept, bred (%s)", g + 1,
                     alpha["score"], len(keep), plan.breed)
    result = keep_the_alpha(dict(result), alpha, score, plan, log)
    result["failed_seeds"] = np.asarray(failed, dtype=np.uint64)
    result["generation_scores"] = history
    return result


PER_REPEAT = ("object", "support", "e_mod", "e_con", "free_deviance", "expected_free_deviance")


def keep_the_alpha(result, alpha, score, plan: Plan, log=None):
    """Elitism: where the best repeat of an earlier generation (the alpha, scored on the full data)
    scores better than every repeat of the last one, it takes the place of its own descendant
    (the last generation's row of its seed, else the worst row), so a generation that made every
    repeat worse cannot lose the best object found (3-D 64^3 random_smooth at 1e9 photons: free
    deviance 2.7 after the first generation, 41 after the next two, docs/cdi.md). The alpha's
    eMod and eCon histories keep their last columns, as many as the last generation's."""
    if alpha is None or plan.low_pass(plan.generations - 1) != alpha["low_pass"]:
        return result
    score = np.asarray(score, dtype=float)
    if not np.isfinite(alpha["score"]) or alpha["score"] >= np.nanmin(score):
        return result
    seeds = [int(s) for s in result["seed"]]
    row = seeds.index(alpha["seed"]) if alpha["seed"] in seeds else int(np.nanargmax(score))
    for key, value in alpha["row"].items():
        if key not in result or len(result[key]) != len(seeds):
            continue
        column = np.array(result[key], copy=True)
        value = np.asarray(value)
        if key in ("e_mod", "e_con"):                 # histories: the alpha's last columns
            width = column.shape[1]
            if value.shape[0] >= width:
                value = value[value.shape[0] - width:]
            else:
                value = np.concatenate([np.full(width - value.shape[0], value[0] if value.size else np.nan),
                                        value])
        column[row] = value
        result[key] = column
    seed_column = np.array(result["seed"], copy=True)
    seed_column[row] = alpha["seed"]
    result["seed"] = seed_column
    if log is not None:
        log.info("the best repeat of generation %d (seed %d, score %.4f) beats every repeat of the last "
                 "generation (best %.4f): it replaces row %d", alpha["generation"] + 1, alpha["seed"],
                 alpha["score"], float(np.nanmin(score)), row)
    return result
