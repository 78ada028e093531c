"""fxs reconstruct: rotational invariants -> single-particle densities by iterative phasing.

1. Read the invariants file (proj_data.h5 of xpr's or xFrame's extract): the projection matrices
   V_l (3-D, B_l = V_l V_l^dagger) or vectors v_n (2-D), their q ranges and the average intensity.
2. Build the polar (2-D) or spherical (3-D) grid pair (midpoint radial grids, Q R = pi N) and the
   harmonic + Hankel transforms between densities and amplitudes (``grids``, ``transforms``); put the data
   on its reciprocal grid (regrid.interpolation: cubic, linear or nearest in q when the grids
   differ) and scale it to one particle (number_of_particles: given, or estimated from the data
   by xFrame's negative-volume heuristic, ``particle_number``); SO_freedom (2-D) fixes one
   order's phase so that all reconstructions share one orientation.
3. The reciprocal projection (``reciprocal_projection``): intensity harmonics of the current
   amplitude, the orthogonal Procrustes fit I_l = V_l U_l per order (2-D: one phase per order),
   rebuilt intensity, modulus scaled to it. The real-space projection (support, positivity) and
   the ER/HIO/DM/RAAR update rules and schedules come from the shared engine ``xpr.phasing``;
   shrink-wrap blurs the density with a Gaussian (a product in reciprocal space).
4. n_reconstructions independent starts (bump x random values), phased in batches along one
   array axis and spread over processes, each with its own seed and progress line; a batch lost
   after its retries is logged and recorded (failed_seeds) and the run goes on if min_success allows.
5. Write data.h5 in xFrame's layout (reconstruction_results sorted by final error, configuration
   with the grids, projection matrices, stats), error_metrics.png, first_Bl.png, N_out_Bl.png,
   vtk/real_N.vts and reciprocal_N.vts of the best two and the worst (3-D), pics/ (2-D).
"""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
from scipy.interpolate import CubicSpline, interp1d

from xpr import parallel
from xpr.backend import BackendSpec
from xpr.errors import InputError
from xpr.fxs.grids import build_grid
from xpr.fxs import memory_plan
from xpr.fxs.iterate import RealSpaceOptions, compile_policies, phase
from xpr.fxs.particle_number import check_search_space, estimate_number_of_particles
from xpr.fxs.real_space import density_guess, radial_field
from xpr.fxs.reciprocal_projection import (InvariantConstraint, InvariantProjection, PointwiseRefinement,
                                           invariants_from_coefficients)
from xpr.fxs.transforms import FourierTransformPair, blas_threads
from xpr.fxs.xframe_settings import fold as fold_xframe_settings
from xpr.phasing.schedule import ITERATING


# ----------------------------------------------------------------------------------------------
# 1. the invariants file
# ----------------------------------------------------------------------------------------------

def input_path(settings, archive) -> Path:
    given = settings.input.invariants_file
    if given:
        return Path(str(given)).expanduser()
    return archive.home.latest("fxs", "invariants", f"{settings.dimensions}d_{settings.structure_name}.h5")


def _ordered_group(group) -> list:
    keys = sorted(group.keys(), key=int)
    return [group[k][()] for k in keys]


def read_invariants(path, dimensions: int) -> dict:
    """The fields of proj_data.h5 that phasing needs, checked."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"invariants file {path} does not exist (run `xpr fxs extract` first or set "
                         "input.invariants_file)", file=path, key="input.invariants_file")
    try:
        with h5py.File(path, "r") as h5:
            needed = ("dimensions", "data_radial_points", "data_projection_matrices", "average_intensity")
            missing = [name for name in needed if name not in h5]
            if missing:
                raise InputError(f"{path.name} is not an invariants file (proj_data.h5): missing "
                                 f"{', '.join(missing)}", file=path, key="input.invariants_file")
            file_dimensions = int(h5["dimensions"][()])
            if file_dimensions != dimensions:
                raise InputError(f"the invariants file holds {file_dimensions}-D data but dimensions is "
                                 f"{dimensions}", file=path, key="dimensions")
            projection = h5["data_projection_matrices"]
            projection = projection["I1I1"] if "I1I1" in projection else projection
            matrices = _ordered_group(projection)
            limits_group = h5.get("data_projection_matrices_q_id_limits")
            limits = None
            if limits_group is not None:
                limits = limits_group["I1I1"][()] if isinstance(limits_group, h5py.Group) else limits_group[()]
            data = {
                "path": path,
                "dimensions": file_dimensions,
                "q": np.asarray(h5["data_radial_points"][()], float),
                "projection_matrices": matrices,
                "q_id_limits": limits,
                "average_intensity": np.asarray(h5["average_intensity"][()], float),
                "max_order": int(h5["max_order"][()]) if "max_order" in h5 else len(matrices) - 1,
                "xray_wavelength": float(h5["xray_wavelength"][()]) if "xray_wavelength" in h5 else 0.0,
                "invariants": h5["deg_2_invariant/I1I1"][()] if "deg_2_invariant/I1I1" in h5 else None,
            }
    except OSError as error:
        raise InputError(f"cannot read {path} as HDF5: {error}", file=path,
                         key="input.invariants_file") from error
    return data


# ----------------------------------------------------------------------------------------------
# 2. grid and the data on it
# ----------------------------------------------------------------------------------------------

def grid_from_settings(settings, data, path):
    g = settings.grid
    if g.max_order > data["max_order"]:
        raise InputError(f"grid.max_order {g.max_order} is above the data's max_order "
                         f"{data['max_order']}", file=path, key="grid.max_order")
    q = data["q"]
    n_radial = g.n_radial_grid_points or len(q)
    data_dq = (q[-1] - q[0]) / max(len(q) - 1, 1)
    max_q = g.max_q or float(q[-1] + data_dq / 2)
    return build_grid(settings.dimensions, n_radial, max_q, g.max_order, g.n_theta, g.n_phi,
                      g.reciprocity_coefficient)


INTERPOLATIONS = ("cubic", "linear", "nearest")


def data_step(q_data) -> float:
    """The data's radial step (mean spacing; the width of one data q cell)."""
    return float((q_data[-1] - q_data[0]) / max(len(q_data) - 1, 1))


def in_data_range(q_grid, q_data) -> np.ndarray:
    """Grid radii inside the data's q cells [q_0 - dq/2, q_last + dq/2] (dq the data's step)."""
    half = data_step(q_data) / 2 * (1 + 1e-9)
    return (q_grid >= q_data[0] - half) & (q_grid <= q_data[-1] + half)


def _to_grid(values, q_data, q_grid, kind: str = "cubic"):
    """Columns of values (N_data, ...) on the grid's q, zero outside the data's q cells.

    kind: cubic (not-a-knot cubic spline: exact for cubic polynomials in q), linear (exact for
    linear profiles) or nearest (the value of the nearest data point). Inside the data range the
    interpolant is used; in the half cells beyond the first and last data point it is extended
    (the data's cells reach there and the constraint acts there); beyond them the result is zero.
    """
    values = np.asarray(values)
    q_data, q_grid = np.asarray(q_data, float), np.asarray(q_grid, float)
    if len(q_data) == len(q_grid) and np.allclose(q_data, q_grid, rtol=1e-6):
        return values
    if kind not in INTERPOLATIONS:
        raise InputError(f"unknown interpolation {kind!r} (known: {', '.join(INTERPOLATIONS)})",
                         key="projections.reciprocal.regrid.interpolation")

    def interpolate(part):
        if len(q_data) == 1:
            return np.broadcast_to(part[:1], (len(q_grid),) + part.shape[1:]).copy()
        if kind == "cubic" and len(q_data) >= 3:
            return CubicSpline(q_data, part, axis=0, extrapolate=True)(q_grid)
        chosen = "linear" if kind == "cubic" else kind          # 2 points: linear is the cubic spline
        return interp1d(q_data, part, kind=chosen, axis=0, fill_value="extrapolate",
                        assume_sorted=True)(q_grid)

    out = interpolate(np.real(values)).astype(complex if np.iscomplexobj(values) else float)
    if np.iscomplexobj(values):
        out = out + 1j * interpolate(np.imag(values))
    out[~in_data_range(q_grid, q_data)] = 0
    return out


def constraint_from_data(data, grid, settings) -> InvariantConstraint:
    """The invariant constraint on the reconstruction's reciprocal grid.

    The data's V_l (l > 0) are divided by sqrt(N) and the average intensity by N, N the particles
    per shot: number_of_particles.initial, or the estimate from the data when
    number_of_particles.estimate is set (``particle_number``; stored in constraint.extra with
    the curve it came from). SO_freedom (2-D) fixes one order's phase (fixed_phase_orders).
    """
    rec = settings.projections.reciprocal
    kind = str(rec.regrid.interpolation)
    q_data, q = data["q"], grid.reciprocal_radii
    dq = data_step(q_data)
    in_data = in_data_range(q, q_data)
    number = rec.number_of_particles
    search_space = check_search_space(number.search_space)
    orders = rec.used_order_ids
    orders = list(range(grid.max_order + 1)) if orders is None else [int(l) for l in orders]
    bad = [l for l in orders if l < 0 or l > grid.max_order]
    if bad:
        raise InputError(f"used_order_ids {bad} are outside 0..{grid.max_order} (grid.max_order)",
                         file=data["path"], key="projections.reciprocal.used_order_ids")
    vectors, masks = {}, {}
    limits = data["q_id_limits"]
    for l in orders:
        V = np.asarray(data["projection_matrices"][l])
        V = V.reshape(len(q_data), -1) if grid.dimensions == 3 else V.reshape(len(q_data))
        if rec.q_mask.type == "from_projection_matrices" and limits is not None:
            low, high = int(limits[l][0]), int(limits[l][1])
            high = min(high, len(q_data)) if high > low else len(q_data)
            lo_q, hi_q = q_data[low] - dq / 2, q_data[high - 1] + dq / 2
            mask = in_data & (q >= lo_q) & (q <= hi_q)
        else:
            mask = in_data.copy()
        vectors[l] = _to_grid(V, q_data, q, kind)                    # as measured (N particles)
        masks[l] = mask
    harmonic_norm = np.sqrt(4 * np.pi) if grid.dimensions == 3 else 1.0
    average = np.real(_to_grid(data["average_intensity"], q_data, q, kind))
    n_particles, estimate = float(number.initial), None
    if number.estimate:
        if rec.use_averaged_intensity or 0 not in vectors:
            zeroth_data = average * harmonic_norm
        else:
            zeroth_data = np.abs(np.asarray(vectors[0]).reshape(len(q)))
        positive = {l: v for l, v in vectors.items()
                    if l > 0 and np.any(masks[l]) and not (l % 2 == 1 and rec.odd_orders_to_0)}
        estimate = estimate_number_of_particles(positive, zeroth_data, grid.dimensions, search_space,
                                                q_mask=in_data)
        n_particles = estimate.n_particles
    for l in vectors:
        if l > 0:
            vectors[l] = vectors[l] / np.sqrt(n_particles)
        else:
            vectors[l] = vectors[l] / n_particles                   # V_0 = I_00 scales as N (B_0 as N^2)
    zeroth = None
    if rec.use_averaged_intensity and 0 in orders:
        zeroth = average / n_particles * harmonic_norm
    fixed = so_freedom_orders(settings, vectors, masks, grid, data["path"])
    constraint = InvariantConstraint(vectors, masks, zeroth, bool(rec.odd_orders_to_0), in_data, grid.max_order,
                                     fixed_phase_orders=fixed)
    constraint.extra.update({"n_particles": n_particles, "particle_number_estimate": estimate})
    return constraint


def so_freedom_orders(settings, vectors, masks, grid, path=None) -> tuple:
    """The order whose phase SO_freedom fixes (2-D), as a tuple: () when SO_freedom is off.

    order: auto picks, among the constrained non-zero even orders, the one with the largest
    mean of q |v_n(q)| over q >= radial_high_pass * max_q (xFrame's ranking of projection
    vectors); an integer names the order.
    """
    so = settings.projections.reciprocal.SO_freedom
    order = so.order
    if isinstance(order, str) and order != "auto":
        raise InputError(f"SO_freedom.order must be auto or an order number, got {order!r}",
                         file=path, key="projections.reciprocal.SO_freedom.order")
    if not so.use:
        return ()
    if grid.dimensions == 3:
        raise InputError("SO_freedom is 2-D only: in 3-D each order has an unknown unitary U_l on which the "
                         "particle's rotation acts through Wigner matrices; xFrame's 3-D variant only makes one "
                         "matrix element real, which does not fix the orientation. Set "
                         "projections.reciprocal.SO_freedom.use: false", file=path,
                         key="projections.reciprocal.SO_freedom.use")
    odd_to_zero = bool(settings.projections.reciprocal.odd_orders_to_0)
    fittable = [n for n in vectors if n > 0 and np.any(masks[n]) and not (n % 2 == 1 and odd_to_zero)]
    if order == "auto":
        q = grid.reciprocal_radii
        high = q >= float(so.radial_high_pass) * grid.max_q
        candidates = [n for n in fittable if n % 2 == 0 and np.any(high & masks[n])]
        if not candidates:
            raise InputError("SO_freedom.order auto found no constrained non-zero even order with data above "
                             f"radial_high_pass x max_q = {float(so.radial_high_pass) * grid.max_q:.4g} 1/Å",
                             file=path, key="projections.reciprocal.SO_freedom.radial_high_pass")
        strength = [float(np.mean((q * np.abs(np.asarray(vectors[n])))[high & masks[n]])) for n in candidates]
        return (int(candidates[int(np.argmax(strength))]),)
    order = int(order)
    if order not in fittable:
        raise InputError(f"SO_freedom.order {order} is not an order whose phase is fitted (the constrained orders "
                         f"> 0{', odd orders excluded by odd_orders_to_0' if odd_to_zero else ''}: "
                         f"{sorted(fittable)})", file=path, key="projections.reciprocal.SO_freedom.order")
    return (order,)


def target_density_norm(constraint: InvariantConstraint, grid) -> float:
    """Int rho^2 implied by the data through Parseval: Int I dq / (2 pi)^d."""
    q, dq, d = grid.reciprocal_radii, grid.dq, grid.dimensions
    if constraint.zeroth_order is not None:
        i0 = constraint.zeroth_order
    else:
        i0 = np.abs(constraint.projection_vectors[0]).reshape(len(q))
    angular = np.sqrt(4 * np.pi) if d == 3 else 2 * np.pi
    total = np.sum(i0 * q ** (d - 1) * dq) * angular
    return float(max(total, 1e-300) / (2 * np.pi) ** d)


# ----------------------------------------------------------------------------------------------
# 3-4. phasing a batch (module level: runs in worker processes)
# ----------------------------------------------------------------------------------------------

def real_space_options(settings, grid=None) -> RealSpaceOptions:
    real = settings.projections.real
    low, high = list(real.value_threshold.threshold) + [None] * (2 - len(real.value_threshold.threshold))
    low, high = (None if low is False else low), (None if high is False else high)
    if high is not None or (low not in (None, 0, 0.0)):
        raise InputError("value_threshold supports [0.0, null] (positivity) or [null, null] (none)",
                         key="projections.real.value_threshold.threshold")
    apply = list(real.apply)
    unknown = [a for a in apply if a not in ("support", "value_threshold", "limit_imag")]
    if unknown:
        raise InputError(f"unknown real-space projections {unknown} (known: support, value_threshold, limit_imag)",
                         key="projections.real.apply")
    return RealSpaceOptions.from_settings(
        settings, positivity=("value_threshold" in apply) and low is not None,
        resolution=None if grid is None else float(np.pi / grid.max_q))


def validate(settings):
    """Values checked before a run folder exists: the main_loop schedule (blocks, counts, betas)
    and the real-space policies compiled into it. The grid's resolution (what xFrame's False
    sigma means) is known only once the invariants are read: a stand-in of 1 Å checks the rest."""
    import dataclasses

    _schedule(settings, dataclasses.replace(real_space_options(settings), resolution=1.0))
    folded, _ = fold_xframe_settings(settings)
    g = folded.grid
    if g.n_radial_grid_points:      # the grid's size is known without the data: its memory is checked here
        grid = build_grid(folded.dimensions, g.n_radial_grid_points, 1.0, g.max_order, g.n_theta, g.n_phi)
        backend = BackendSpec.from_settings(folded)
        memory_plan.plan_reconstruct(grid, folded, 8 if backend.precision == "double" else 4,
                                     on_gpu=backend.on_device)


def _schedule(settings, options):
    """The steps of main_loop with the real-space policies compiled in (what runs and is logged)
    and, for the progress line, the block name of each step."""
    from xpr.phasing.schedule import parse_blocks

    main_loop = settings.main_loop.to_dict() if hasattr(settings.main_loop, "to_dict") else dict(settings.main_loop)
    names = []
    steps = parse_blocks(main_loop, key="main_loop", names=names)
    if any(step.method == "ML" for step in steps):
        raise InputError("ML (the Poisson likelihood step of cdi) needs measured counts; fxs "
                         "invariants have none: use ER, HIO, RAAR or DM", key="main_loop")
    return compile_policies(steps, options, names), names


def to_xframe_layout(field, dimensions):
    """(phi, theta, N) -> (N, theta, phi); (phi, N) -> (N, phi)."""
    return np.moveaxis(field, -1, 0) if dimensions == 2 else np.transpose(field, (2, 1, 0))


def phase_batch(task: dict) -> list:
    """Phase one batch of reconstructions; returns one result dict per reconstruction."""
    with blas_threads(1):
        return _phase_batch(task)


def _phase_batch(task: dict) -> list:
    settings = task["settings"]
    backend = task["backend"].create()
    grid = task["grid"]
    transform = FourierTransformPair(grid, backend)
    refinement = settings.projections.reciprocal.modulus_refinement
    projection = InvariantProjection(transform, task["constraint"],
                                     PointwiseRefinement(int(refinement.steps), float(refinement.step_size),
                                                         float(refinement.max_weight_ratio)))
    xp = backend.xp
    n = len(task["seeds"])
    guess = settings.density_guess
    radius = guess.radius or settings.particle_radius
    densities = []
    for seed in task["seeds"]:
        rng = np.random.default_rng(seed)
        densities.append(backend.asnumpy(density_guess(grid, 1, radius, guess.type, guess.bump.slope,
                                                       guess.amplitude_function, guess.random.SNR,
                                                       rng, task["target_norm"], np)))
    initial = xp.asarray(np.concatenate(densities, axis=-2), dtype=backend.real_dtype)
    real = settings.projections.real
    support_radius = real.support.initial_support.max_radius or settings.particle_radius
    apply_support = "support" in real.apply
    support = radial_field(grid, grid.real_radii <= (support_radius if apply_support else np.inf), n, xp).astype(bool)

    from tqdm.auto import tqdm

    total = sum(s.iterations for s in task["steps"] if s.method != "SW")
    with tqdm(total=total, desc=f"reconstructions {task['first']}-{task['first'] + n - 1}",
              position=task["position"], disable=not task["bars"], leave=False, dynamic_ncols=True) as bar:
        start = time.perf_counter()
        result = phase(transform, projection, task["steps"], initial, support, task["options"],
                       progress=bar, loop_names=task["loop_names"],
                       fit_metrics=dict(settings.projections.reciprocal.fit_metric))
        seconds = time.perf_counter() - start

    best = xp.asarray(result["real_density"])
    last = xp.asarray(result["last_real_density"])
    best_amplitude = backend.asnumpy(transform.forward(best))
    last_amplitude = backend.asnumpy(transform.forward(last))
    intensity_coefficients = backend.asnumpy(transform.real_harmonic_coefficients(
        xp.asarray(np.abs(best_amplitude) ** 2)))
    initial = backend.asnumpy(initial)
    d = grid.dimensions
    out = []
    for b in range(n):
        pick = (lambda a: a[..., b, :])
        coefficients = intensity_coefficients[..., b, :]
        out.append({
            "final_error": float(result["best_error"][b]),
            "seed": np.uint64(task["seeds"][b]),
            "error_dict": {"main": result["errors_main"][b],
                           "real": {"l2_projection_diff": result["errors_main"][b]},
                           "reciprocal": {"modulus_error": result["errors_modulus"][b]}},
            "real_density": to_xframe_layout(pick(result["real_density"]), d),
            "reciprocal_density": to_xframe_layout(pick(best_amplitude), d),
            "support_mask": to_xframe_layout(pick(result["support_mask"]), d),
            "initial_density": to_xframe_layout(pick(initial), d),
            "last_real_density": to_xframe_layout(pick(result["last_real_density"]), d),
            "last_reciprocal_density": to_xframe_layout(pick(last_amplitude), d),
            "last_support_mask": to_xframe_layout(pick(result["last_support_mask"]), d),
            "n_particles": float(task["n_particles"]),
            "loop_iterations": int(total),
            "invariants": invariants_from_coefficients(coefficients, d, transform.ms),
            "seconds_per_iteration": seconds / max(total, 1),
        })
    return out


# ----------------------------------------------------------------------------------------------
# quality: the invariants of the results against the data
# ----------------------------------------------------------------------------------------------

def invariant_mismatch(invariants, constraint: InvariantConstraint, dimensions: int) -> np.ndarray:
    """Per order: ||B_l(result) - V_l V_l^dagger|| / ||V_l V_l^dagger|| on the constrained q range.

    Order 0 compares with the average intensity when that was the constraint.
    """
    out = np.full(len(invariants), np.nan)
    for l, B in enumerate(invariants):
        mask = constraint.q_masks.get(l)
        if mask is None or not np.any(mask):
            continue
        if l == 0 and constraint.zeroth_order is not None:
            reference = np.outer(constraint.zeroth_order, constraint.zeroth_order)
        elif l in constraint.projection_vectors:
            V = np.asarray(constraint.projection_vectors[l])
            V = V[:, None] if V.ndim == 1 else V
            reference = V @ V.conj().T
        else:
            continue
        m2 = np.outer(mask, mask)
        norm = np.linalg.norm(reference[m2])
        if norm > 0:
            out[l] = np.linalg.norm((B - reference)[m2]) / norm
    return out


# ----------------------------------------------------------------------------------------------
# 5. output
# ----------------------------------------------------------------------------------------------

def shrink_wrap_iterations(steps) -> list:
    """Global iteration counts after which each SW step of a compiled schedule runs."""
    done, at = 0, []
    for step in steps:
        if step.method == "SW":
            at.append(done)
        elif step.method in ITERATING:
            done += step.iterations
    return at


def _figures(archive, results, constraint, grid, data, settings, steps=()):
    """error_metrics.png: per reconstruction, the real-space error (xFrame's main metric, by which the
    kept density is chosen) and the modulus error at every iteration, the shrink-wrap updates as
    dotted lines and each reconstruction's kept (least-error) iteration as a dot. The real-space
    error is measured against the current support: after a shrink-wrap tightens it, more of P_M ρ
    lies outside and the error jumps, so values are comparable only between two shrink-wraps, and
    the kept density can come from an early block (see docs/fxs_reconstruct.md)."""
    from xpr import plot

    fig, (top, bottom) = plot.figure(2, 1, size=(7.0, 3.2), sharex=True)
    sw = shrink_wrap_iterations(steps)
    for i, r in enumerate(results):
        main = np.asarray(r["error_dict"]["main"])
        modulus = np.asarray(r["error_dict"]["reciprocal"]["modulus_error"])
        iterations = np.arange(1, len(main) + 1)
        best = int(np.argmin(main))
        line, = top.semilogy(iterations, main, lw=0.8, label=f"{i}: kept {main[best]:.2e} at it. {best + 1}")
        top.plot(best + 1, main[best], "o", ms=3, color=line.get_color())
        bottom.semilogy(iterations, modulus, lw=0.8, color=line.get_color())
    for ax in (top, bottom):
        for k, at in enumerate(sw):
            ax.axvline(at + 0.5, color="grey", lw=0.5, ls=":", label="shrink-wrap" if (k == 0 and ax is top) else None)
    top.set_ylabel("real-space error\n‖P_S P_M ρ − P_M ρ‖²/‖P_M ρ‖²", fontsize=8)
    top.set_title("error per iteration (against the current support; the dot: the density kept)", fontsize=9)
    bottom.set_ylabel("modulus error\n‖|A| − |A'|‖/‖A'‖", fontsize=8)
    bottom.set_xlabel("iteration")
    top.legend(fontsize=6, ncol=2)
    archive.savefig(fig, "error_metrics.png")

    n_orders = settings.output.n_plotted_orders
    step = 2 if settings.projections.reciprocal.odd_orders_to_0 else 1
    orders = [l for l in range(0, grid.max_order + 1, step)][:n_orders]
    q = grid.reciprocal_radii
    for name, source, title in (("first_Bl.png", None, "data V_l V_l†"),
                                ("N_out_Bl.png", results[0]["invariants"], "best reconstruction B_l")):
        fig, axes = plot.figure(1, len(orders), size=(3.2, 3.0))
        axes = np.atleast_1d(axes)
        for ax, l in zip(axes, orders):
            if source is None:
                if l == 0 and constraint.zeroth_order is not None:
                    B = np.outer(constraint.zeroth_order, constraint.zeroth_order)
                else:
                    V = np.asarray(constraint.projection_vectors.get(l, np.zeros(len(q))))
                    V = V[:, None] if V.ndim == 1 else V
                    B = V @ V.conj().T
            else:
                B = source[l]
            plot.image(ax, np.abs(B), title=f"|B_{l}|", extent=(q[0], q[-1], q[0], q[-1]))
        fig.suptitle(title)
        archive.savefig(fig, name)


def _pictures_2d(archive, results, grid):
    from xpr import plot
    from xpr.fxs.alignment import resample

    extent = grid.real_radii[-1] / 2
    xs = np.linspace(-extent, extent, 201)
    points = np.stack(np.meshgrid(xs, xs, indexing="xy"), axis=-1)
    for i, r in enumerate(results):
        density = np.moveaxis(r["real_density"], 0, -1)               # (phi, N)
        fig, ax = plot.figure(size=(4.5, 4.0))
        plot.image(ax, resample(density, grid, points), title=f"reconstruction {i}, error {r['final_error']:.2e}",
                   extent=(-extent, extent, -extent, extent))
        archive.savefig(fig, f"pics/reconstruction_{i}.png")


def _vtk(archive, results, grid):
    picks = sorted(set([0, 1, len(results) - 1]) & set(range(len(results))))
    for i in picks:
        r = results[i]
        archive.save_vts(f"vtk/real_{i}.vts", {"density": r["real_density"]}, grid="spherical",
                         axes=[grid.real_radii, grid.thetas, grid.phis])
        archive.save_vts(f"vtk/reciprocal_{i}.vts", {"amplitude": r["reciprocal_density"]}, grid="spherical",
                         axes=[grid.reciprocal_radii, grid.thetas, grid.phis])


def run(settings, archive):
    """Invariants -> n_reconstructions densities, sorted by final error, in data.h5."""
    start = time.time()
    settings, notes = fold_xframe_settings(settings)
    for note in notes:
        archive.log.info("xFrame settings: %s", note)
    path = input_path(settings, archive)
    data = read_invariants(path, settings.dimensions)
    archive.log.info("invariants from %s (%d-D, max_order %d, %d radial points)", path,
                     data["dimensions"], data["max_order"], len(data["q"]))
    grid = grid_from_settings(settings, data, path)
    constraint = constraint_from_data(data, grid, settings)
    n_particles = float(constraint.extra["n_particles"])
    estimate = constraint.extra["particle_number_estimate"]
    if estimate is not None:
        archive.log.info("number of particles per shot estimated from the data: N = %.3g (negative-volume "
                         "inflection at s = sqrt(N) = %.3g; a rough heuristic, see xpr/fxs/particle_number.py)",
                         n_particles, np.sqrt(n_particles))
        if estimate.n_particles in (float(estimate.scales[0] ** 2), float(estimate.scales[-1] ** 2)):
            archive.log.warning("the particle-number estimate lies at the end of search_space %s: widen "
                                "projections.reciprocal.number_of_particles.search_space",
                                list(settings.projections.reciprocal.number_of_particles.search_space))
    if constraint.fixed_phase_orders:
        archive.log.info("SO_freedom: the phase of order %d is fixed (orientation fixed up to rotations by "
                         "2π/%d)", constraint.fixed_phase_orders[0], constraint.fixed_phase_orders[0])
    options = real_space_options(settings, grid)
    steps, loop_names = _schedule(settings, options)
    from xpr.phasing.schedule import describe

    archive.log.info("grid: %d radial x %s angular points, L = %d; schedule: %s", grid.n_radial,
                     "x".join(map(str, grid.angular_shape)), grid.max_order, describe(steps))

    backend = BackendSpec.from_settings(settings)
    n = settings.n_reconstructions
    seeds = parallel.task_seeds(settings.random_seed, n)
    # reconstructions per batch: multi_process.batch_size, fewer when their memory would not fit
    batch = memory_plan.plan_reconstruct(grid, settings, 8 if backend.precision == "double" else 4,
                                         on_gpu=backend.on_device, log=archive.log)
    tasks = [{"settings": settings, "backend": backend, "grid": grid, "constraint": constraint,
              "steps": steps, "loop_names": loop_names, "options": options,
              "target_norm": target_density_norm(constraint, grid), "seeds": seeds[i:i + batch],
              "n_particles": n_particles,
              "first": i, "position": k, "bars": archive.shows_bars}
             for k, i in enumerate(range(0, n, batch))]
    # a batch whose process is lost (or raises) is retried; one that still fails is logged,
    # recorded in data.h5 (failed_seeds) and left out, as long as min_success of them succeeded
    batches = parallel.map(phase_batch, tasks, settings.multi_process, tolerate_failures=True,
                           gpus=backend.gpus())
    failures = [b for b in batches if isinstance(b, parallel.TaskFailure)]
    for failure in failures:
        archive.log.warning("batch %d (reconstructions %d-%d, seeds %s) failed: %s", failure.index,
                            tasks[failure.index]["first"],
                            tasks[failure.index]["first"] + len(tasks[failure.index]["seeds"]) - 1,
                            tasks[failure.index]["seeds"], failure.error)
    batches = parallel.require_success(batches, settings.multi_process)
    failed_seeds = np.asarray([s for f in failures for s in tasks[f.index]["seeds"]], dtype=np.uint64)
    results = [r for batch_results in batches for r in batch_results]
    if not results:
        raise RuntimeError("no batch of reconstructions succeeded")
    order = np.argsort([r["final_error"] for r in results])
    results = [results[i] for i in order]
    mismatch = np.array([invariant_mismatch(r["invariants"], constraint, grid.dimensions) for r in results])
    for i, r in enumerate(results):
        r["invariant_mismatch"] = mismatch[i]
    archive.log.info("final errors (sorted): %s", " ".join(f"{r['final_error']:.2e}" for r in results))
    archive.log.info("median invariant mismatch of the best reconstruction, orders > 0: %.2e",
                     float(np.nanmedian(mismatch[0][1:])) if mismatch.shape[1] > 1 else float("nan"))

    per_iteration = float(np.mean([r.pop("seconds_per_iteration") for r in results]))
    projection_matrices = {str(l): np.asarray(v) for l, v in constraint.projection_vectors.items()}
    tree = {
        "configuration": {
            "internal_grid": {"real_radii": grid.real_radii, "reciprocal_radii": grid.reciprocal_radii,
                              "phis": grid.phis,
                              **({"thetas": grid.thetas, "theta_weights": grid.theta_weights}
                                 if grid.dimensions == 3 else {})},
            "dimensions": grid.dimensions,
            "max_order": grid.max_order,
            "xray_wavelength": data["xray_wavelength"],
            "reciprocity_coefficient": float(settings.grid.reciprocity_coefficient),
            "particle_radius": float(settings.particle_radius),
            "invariants_file": str(path),
            "n_particles": n_particles,
            "fixed_phase_orders": np.asarray(constraint.fixed_phase_orders, dtype=int),
            "regrid_interpolation": str(settings.projections.reciprocal.regrid.interpolation),
        },
        "reconstruction_results": {str(i): r for i, r in enumerate(results)},
        "projection_matrices": projection_matrices,
        "stats": {"run_time": time.time() - start, "seconds_per_iteration_per_batch": per_iteration},
        "failed_seeds": failed_seeds,
    }
    if estimate is not None:
        tree["number_of_particles_estimate"] = {"n_particles": estimate.n_particles, "scales": estimate.scales,
                                                "negative_fraction": estimate.negative_fraction,
                                                "gradient": estimate.gradient}
    archive.set_link_name(f"{settings.dimensions}d_{settings.structure_name}.h5")
    archive.save_h5("data.h5", tree, main=True)
    if settings.output.plots:
        _figures(archive, results, constraint, grid, data, settings, steps)
        if grid.dimensions == 2:
            _pictures_2d(archive, results, grid)
    if settings.output.vtk and grid.dimensions == 3:
        _vtk(archive, results, grid)
    archive.log.info("run time %.1f s (%.3f s per iteration per batch of %d)", time.time() - start,
                     per_iteration, min(batch, n))
    return {"results": results, "grid": grid, "constraint": constraint}
