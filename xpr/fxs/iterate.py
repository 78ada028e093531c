"""fxs phasing on the shared engine: `phase` runs a schedule on a batch of densities with
xpr.phasing.engine.iterate (repeats on axis -2), fxs's shrink-wrap as its SW operation, a
callback computing xFrame's real-space error and keeping each repeat's best density, and the
reciprocal projection's fit metric switched per algorithm; `compile_policies` compiles the
HIO beta and shrink-wrap ramps of RealSpaceOptions into the schedule first."""
from __future__ import annotations

import numpy as np

from xpr.fxs.grids import PhasingGrid
from xpr.fxs.real_space import shrink_wrap
from xpr.fxs.transforms import FourierTransformPair, integrate
from xpr.options import options, setting


def _hio_betas(beta):
    """projections.real.HIO.beta as a ramp specifier, None when not given (the steps' own betas)."""
    return None if beta in (None, False, ()) else beta


@options("fxs", "reconstruct")
class RealSpaceOptions:
    """Real-space constraints and their schedules (xFrame's projections.real; the defaults are
    those of settings_defaults/fxs/reconstruct.yaml).

    sw_sigmas, sw_thresholds: ramp specifiers (xpr.phasing.schedule.ramp_values: [first, last]
    linear over the shrink-wraps, or xFrame's segments) for SW steps that set no value of their
    own; hio_betas: a ramp specifier ([first, last] exponential, or xFrame's segments) over the
    HIO iterations of every HIO step without its own beta (None: the steps' own betas).
    positivity and resolution are derived (xpr.fxs.reconstruct.real_space_options): positivity
    from `apply` and value_threshold, resolution from the grid.
    """

    positivity: bool = True
    sw_sigmas: tuple = setting("projections.real.shrink_wrap.sigmas")                # Å
    sw_thresholds: tuple = setting("projections.real.shrink_wrap.thresholds")        # of the blurred maximum
    hio_betas: tuple | None = setting("projections.real.HIO.beta", _hio_betas)
    enforce_initial_support: bool = setting("projections.real.support.enforce_initial_support.apply", bool)
    enforce_if_error_bigger_than: float = setting(
        "projections.real.support.enforce_initial_support.if_error_bigger_than", float)
    resolution: float | None = None         # Å: xFrame's False sigma (the half-period resolution)


def compile_policies(steps, options: RealSpaceOptions, names=None) -> list:
    """The schedule with the HIO beta ramp and the shrink-wrap sigma/threshold ramps compiled
    into its steps (a block's own beta and an SW step's own sigma/threshold are kept); names: the
    block of each step (for xFrame's per-block specifiers). Pure and idempotent: what `describe`
    of the result shows is what `phase` runs."""
    from xpr.phasing import schedule

    key = "projections.real"
    if options.hio_betas is not None:
        steps = schedule.apply_beta_ramp(steps, _plain(options.hio_betas), ("HIO",), "exponential",
                                         key=f"{key}.HIO.beta", names=names)
    steps = schedule.apply_option_ramp(steps, "SW", "sigma", _plain(options.sw_sigmas), "linear",
                                       key=f"{key}.shrink_wrap.sigmas", names=names,
                                       false_value=options.resolution)
    return schedule.apply_option_ramp(steps, "SW", "threshold", _plain(options.sw_thresholds), "linear",
                                      key=f"{key}.shrink_wrap.thresholds", names=names)


def _plain(spec):
    """Settings lists arrive as tuples (frozen): nested lists again, numbers as they are."""
    if isinstance(spec, (list, tuple)):
        return [_plain(v) for v in spec]
    return spec


def real_space_error(projected, constrained, grid: PhasingGrid, xp):
    """xFrame's l2_projection_diff: ||P_S(P_M x) - P_M x||^2 / ||P_M x||^2, per repeat."""
    diff = integrate((projected - constrained) ** 2, grid, "real", xp)
    norm = integrate(projected ** 2, grid, "real", xp)
    return diff / xp.maximum(norm, 1e-300)


class _RecordingProjection:
    """Wraps P_M so the loop sees the last projected density without another transform."""

    def __init__(self, projection):
        self.projection = projection
        self.last = None

    def __call__(self, x):
        projected, e_mod = self.projection(x)
        self.last = projected
        return projected, e_mod


class _BestTracker:
    """Engine callback: xFrame's real-space error of every iteration and, per repeat, the
    constrained density, support and error of its best iteration so far."""

    def __init__(self, P_M, P_S, grid, backend, density, support, progress=None, loop_names=None,
                 steps=()):
        self.P_M, self.P_S, self.grid, self.backend = P_M, P_S, grid, backend
        n_repeats = density.shape[-2]
        self.best_error = np.full(n_repeats, np.inf)
        self.best_density = density.copy()
        self.best_support = support.copy()
        self.errors_main, self.errors_mod = [], []
        self.progress = progress
        self.names = {id(step): name for step, name in zip(steps, loop_names or [])}

    def latest_error(self):
        return self.errors_main[-1] if self.errors_main else np.full(len(self.best_error), np.inf)

    def __call__(self, state):
        xp = self.backend.xp
        projected = self.P_M.last
        constrained = self.P_S(projected, state.support, xp)
        e_real = self.backend.asnumpy(real_space_error(projected, constrained, self.grid, xp))
        self.errors_main.append(e_real)
        self.errors_mod.append(self.backend.asnumpy(state.e_mod))
        improved = e_real < self.best_error
        if np.any(improved):
            chosen = xp.asarray(improved)[:, None]       # (B, 1) broadcasts over (.., B, N)
            self.best_density = xp.where(chosen, constrained, self.best_density)
            self.best_support = xp.where(chosen, state.support, self.best_support)
            self.best_error = np.where(improved, e_real, self.best_error)
        if self.progress is not None:
            name = self.names.get(id(state.step), "")
            self.progress.set_postfix_str(f"{name} {state.step.method} error {np.median(e_real):.2e} "
                                          f"best {np.min(self.best_error):.2e}", refresh=False)
            self.progress.update(1)


def phase(transform: FourierTransformPair, projection, steps, density, support, options: RealSpaceOptions,
          progress=None, loop_names=None, fit_metrics=None):
    """Run a schedule (xpr.phasing.schedule steps) on a batch of densities with the shared engine.

    density: (*angular, B, N) real, repeats on axis -2; support: bool, same shape. The policies
    of `options` are compiled into the steps first (compile_policies). fit_metrics: algorithm
    name -> metric of the reciprocal projection's Procrustes fits during its steps ('intensity'
    or 'modulus', InvariantProjection.use_metric); None: the projection's own. Returns a dict of
    numpy arrays: best and last densities, supports, error histories (per repeat), the beta of
    every iteration.
    """
    from xpr.phasing.engine import iterate
    from xpr.phasing.projections import SupportProjection

    xp = transform.xp
    steps = compile_policies(steps, options, loop_names)
    P_S = SupportProjection(positivity=options.positivity, batch_axis=-2)
    P_M = _RecordingProjection(projection)
    initial_support = support.copy()
    tracker = _BestTracker(P_M, P_S, transform.grid, transform.backend, density, support, progress,
                           loop_names, steps)

    def shrink_wrap_step(x, support, step):
        current = P_S(P_M.last, support, xp) if P_M.last is not None else x
        confine = None
        if options.enforce_initial_support:
            enforce = xp.asarray(tracker.latest_error() > options.enforce_if_error_bigger_than)[:, None]
            confine = xp.where(enforce, initial_support, True)          # per repeat
        new = shrink_wrap(current, transform, float(step.options["sigma"]), float(step.options["threshold"]),
                          confine)
        if progress is not None:
            progress.update(0)
        return new

    def on_step(step):
        if fit_metrics and step.method in fit_metrics:
            projection.use_metric(fit_metrics[step.method])

    x, support, history = iterate(steps, density.copy(), support, P_M, P_S, xp=xp, metrics_every=0,
                                  batch_axis=-2, operations={"SW": shrink_wrap_step},
                                  callbacks=(tracker,), on_step=on_step)
    last_density = P_S(P_M.last, support, xp)
    asnumpy = transform.backend.asnumpy
    return {
        "real_density": asnumpy(tracker.best_density),
        "support_mask": asnumpy(tracker.best_support),
        "last_real_density": asnumpy(last_density),
        "last_support_mask": asnumpy(support),
        "errors_main": np.array(tracker.errors_main).T,          # (B, iterations)
        "errors_modulus": np.array(tracker.errors_mod).T,
        "best_error": tracker.best_error,
        "betas": np.asarray(history.betas, dtype=float),
    }
