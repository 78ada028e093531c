"""fxs reconstruct options from xFrame's projections.reciprocal: number_of_particles (estimate),
SO_freedom (2-D orientation fixing) and regrid.interpolation."""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import yaml
from test_reconstruct import SCHEDULE_2D, densities_of, discs_2d, write_invariants_file

from xpr.backend import Backend
from xpr.fxs.alignment import align, centre, correlation, find_rotation_2d, harmonic_coefficients, relative_error
from xpr.fxs.grids import build_grid, gaussian_blobs
from xpr.fxs.particle_number import estimate_number_of_particles
from xpr.fxs.reciprocal_projection import constraint_from_density
from xpr.fxs.reconstruct import _to_grid, in_data_range
from xpr.fxs.transforms import FourierTransformPair
from xpr.io.h5 import load_tree

BLOBS = ([(0, 0, 0), (60, 10, 0), (-20, 55, 30)], [25, 14, 14], [1.0, 2.0, 1.5])


def _write(tmp_path, name, tree):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# ----------------------------------------------------------------------------------------------
# number_of_particles
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dimensions,grid_args,low,high", [(2, (64, 0.5, 32), 0.5, 2.0), (3, (32, 0.3, 20), 0.5, 2.0)])
def test_particle_number_estimate(dimensions, grid_args, low, high):
    """Exact invariants of three Gaussian blobs, with the data scaled as for N particles per shot
    (V_l -> sqrt(N) V_l for l > 0, Ī -> N Ī) for N = 1, 4, 16:

    * the estimate is scale-equivariant, estimate(N)/N the same for every N to 5 % (the spacing
      of the scan of s = sqrt(N)): the heuristic's error is a property of the particle, not of N;
    * it is within [low, high] x N.

    Measured (phase-averaged estimate, default search space): 2-D blobs 1.12-1.15 N, 2-D discs
    (xFrame's three discs) 1.00-1.01 N, 3-D blobs 1.45-1.47 N; the 3-D tutorial cluster through
    simulate_ccd + extract 0.73-0.88 N (through reconstruct: 0.735, 0.755, 0.745 N for N = 1, 4,
    16). Poor regime: the 2-D tutorial cluster (six triangles, 85 % of its l > 0 power in orders
    2 and 10) comes out at 0.40-0.44 N (through reconstruct: 0.41, 0.43, 0.42 N), outside this
    tolerance.
    The estimate tells 1 from 4 from 16 particles; it does not give N to 10 %.
    """
    grid = build_grid(dimensions, *grid_args)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    centres, widths, heights = BLOBS
    density = gaussian_blobs(grid, [c[:dimensions] for c in centres], widths, heights)
    constraint, _ = constraint_from_density(density, transform)
    ratios = []
    for n in (1, 4, 16):
        vectors = {l: V * np.sqrt(n) for l, V in constraint.projection_vectors.items() if l > 0 and l % 2 == 0}
        estimate = estimate_number_of_particles(vectors, constraint.zeroth_order * n, dimensions)
        ratios.append(estimate.n_particles / n)
        # the negative volume grows from 0 (s -> 0: order 0 dominates everywhere) and its slope peaks at s*
        assert estimate.negative_fraction[0] < estimate.negative_fraction[-1]
        assert estimate.n_particles == pytest.approx(estimate.scales[np.argmax(estimate.gradient)] ** 2)
    assert max(ratios) / min(ratios) < 1.05, ratios
    assert all(low <= r <= high for r in ratios), ratios


def test_reconstruct_estimates_the_number_of_particles(home, run_xpr, tmp_path):
    """simulate_ccd with 4 particles per shot -> extract -> reconstruct with
    number_of_particles.estimate: the estimate (measured 3.02 for this 3-D tutorial cluster) is
    within a factor 2 of 4, logged, stored in data.h5 and used: the constraint's V_l are the
    data's divided by sqrt(N), its order 0 the average intensity divided by N."""
    chain = run_xpr(["-q", "fxs", "simulate_ccd", "tutorial", "-o", "n_particles=4", "-o", "structure_name=four",
                     "extract", "tutorial", "-o", "structure_name=four"])
    assert chain.exit_code == 0, chain.output
    settings = {"structure_name": "four", "dimensions": 3, "particle_radius": 170.0, "n_reconstructions": 1,
                "grid": {"max_order": 24},
                "projections": {"reciprocal": {"number_of_particles": {"estimate": True}}},
                "main_loop": {"sub_loops": {"order": ["main"], "main": {"iterations": 1, "order": ["ER"],
                                                                         "methods": {"ER": {"iterations": 2}}}}},
                "multi_process": {"n_processes": 1}, "output": {"plots": False, "vtk": False}}
    result = run_xpr(["fxs", "reconstruct", _write(tmp_path, "four", settings)])
    assert result.exit_code == 0, result.output
    assert "number of particles per shot estimated from the data" in result.output
    link = home / "data" / "fxs" / "reconstructions" / "3d_four.h5"
    tree = load_tree(link)
    n = float(tree["configuration"]["n_particles"])
    assert 2.0 <= n <= 8.0, n
    assert float(tree["reconstruction_results"]["0"]["n_particles"]) == n
    assert float(tree["number_of_particles_estimate"]["n_particles"]) == n
    with h5py.File(home / "data" / "fxs" / "invariants" / "3d_four.h5") as h5:
        V2 = h5["data_projection_matrices/I1I1/2"][()]
    np.testing.assert_allclose(tree["projection_matrices"]["2"], V2 / np.sqrt(n), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# SO_freedom
# ----------------------------------------------------------------------------------------------

def _discs_run(home, run_xpr, tmp_path, name, so_freedom):
    """Four 2-D reconstructions from the exact invariants (v_n = I_n of the model) of xFrame's
    three discs; their centred densities, the centred model, the transform and data.h5."""
    grid = build_grid(2, 64, 0.5, 32)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    model = discs_2d(grid, transform)
    data = write_invariants_file(tmp_path / "proj_data.h5", model, transform)
    settings = {"structure_name": name, "dimensions": 2, "particle_radius": 150.0, "n_reconstructions": 4,
                "random_seed": 5, "input": {"invariants_file": str(data)}, "grid": {"max_order": 32},
                "projections": {"real": {"shrink_wrap": {"sigmas": [20.0, 6.0]}},
                                "reciprocal": {"SO_freedom": so_freedom}},
                "main_loop": copy.deepcopy(SCHEDULE_2D), "multi_process": {"batch_size": 4, "n_processes": 1},
                "output": {"plots": False}}
    result = run_xpr(["fxs", "reconstruct", _write(tmp_path, name, settings)])
    assert result.exit_code == 0, result.output
    densities, _, tree = densities_of(home / "data" / "fxs" / "reconstructions" / f"2d_{name}.h5", 2)
    reference, _ = centre(model, grid, transform)
    centred = [centre(d, grid, transform)[0] for d in densities]
    # reconstructions that reached the particle (any orientation): at least two of the four
    good = [d for d in centred if relative_error(align(d, reference, transform)[0], reference, grid) <= 0.1]
    assert len(good) >= 2, name
    return good, reference, transform, tree, result.output


def _angle_between(a, b, transform):
    """Rotation angle (rad, in [0, 2 pi)) that best brings b onto a (no mirror)."""
    weights = transform.grid.real_radii * transform.grid.dr
    angle, _ = find_rotation_2d(harmonic_coefficients(a, transform), harmonic_coefficients(b, transform),
                                transform.ms, weights, consider_mirror=False)
    return angle % (2 * np.pi)


def _off_multiple(angle, n):
    """Distance (rad) of an angle from the nearest multiple of 2 pi / n."""
    step = 2 * np.pi / n
    return abs((angle + step / 2) % step - step / 2)


def test_so_freedom_fixes_the_orientation(home, run_xpr, tmp_path):
    """2-D, SO_freedom with order 2: the phase a_2 := 0 leaves only the rotation by pi, which in
    2-D is the point inversion rho(x) -> rho(-x) that no invariant distinguishes. Every
    reconstruction that reaches the particle then correlates > 0.98 with the model (whose own
    I_n are the data's v_n, so a_n = 0 is the model's orientation) and with each other, as they
    come or inverted, without any rotational alignment (measured: > 0.998, rotations 0.1-0.4
    degrees off). Without SO_freedom the same starts come out in arbitrary orientations
    (measured: 165-225 degrees apart, correlation 0.72-0.75 unaligned)."""
    good, reference, transform, tree, output = _discs_run(home, run_xpr, tmp_path, "so2", {"use": True, "order": 2})
    assert list(tree["configuration"]["fixed_phase_orders"]) == [2]
    assert "phase of order 2 is fixed" in output
    grid = transform.grid

    def unaligned(a, b):                                # best of b and its point inversion, no rotation search
        inverted = np.roll(b, len(grid.phis) // 2, axis=0)
        return max(correlation(a, b, grid), correlation(a, inverted, grid))

    for d in good:
        assert unaligned(d, reference) > 0.98
        assert _off_multiple(_angle_between(reference, d, transform), 2) < np.radians(2)
    for d in good[1:]:
        assert unaligned(good[0], d) > 0.98

    free, *_ = _discs_run(home, run_xpr, tmp_path, "free", {"use": False})
    assert max(_off_multiple(_angle_between(free[0], d, transform), 2) for d in free[1:]) > np.radians(10)


def test_so_freedom_auto_order(home, run_xpr, tmp_path):
    """SO_freedom with order auto picks the constrained non-zero even order with the largest mean
    of q |v_n(q)| above radial_high_pass x max_q (here n = 12 for the three discs); the
    reconstructions that reach the particle then differ by rotations that are multiples of
    2 pi / n to within 2 degrees (measured: 0.1-0.6 degrees), and lie so with respect to the model."""
    good, reference, transform, tree, output = _discs_run(home, run_xpr, tmp_path, "auto", {"use": True})
    (order,) = [int(n) for n in tree["configuration"]["fixed_phase_orders"]]
    q = transform.grid.reciprocal_radii
    high = q >= 0.2 * transform.grid.max_q
    vectors = tree["projection_matrices"]
    strength = {n: float(np.mean(q[high] * np.abs(vectors[str(n)])[high])) for n in range(2, 33, 2)}
    assert order == max(strength, key=strength.get) == 12
    for d in good:
        assert _off_multiple(_angle_between(reference, d, transform), order) < np.radians(2)
    for d in good[1:]:
        assert _off_multiple(_angle_between(good[0], d, transform), order) < np.radians(2)


# ----------------------------------------------------------------------------------------------
# regrid
# ----------------------------------------------------------------------------------------------

Q_DATA = (np.arange(20) + 0.5) * 0.3 / 20                  # the data's midpoint grid, step 0.015
Q_GRID = (np.arange(37) + 0.5) * 0.34 / 37                 # a finer grid reaching beyond the data


@pytest.mark.parametrize("kind,degree", [("linear", 1), ("cubic", 3)])
def test_regrid_reproduces_polynomials(kind, degree):
    """On a grid that differs from the data's, linear interpolation reproduces a linear profile
    and cubic (not-a-knot spline) a cubic to rounding, complex columns alike, including the half
    cells beyond the first and last data point; beyond the data's cells the values are zero."""
    coefficients = [2.0, -3.0, 5.0, -7.0][:degree + 1]
    profile = np.polynomial.polynomial.polyval(Q_DATA, coefficients)
    values = np.stack([profile, (1 + 2j) * profile], axis=1)
    out = _to_grid(values, Q_DATA, Q_GRID, kind)
    inside = in_data_range(Q_GRID, Q_DATA)
    assert inside.sum() > 20 and (~inside).sum() > 0 and np.any(inside & (Q_GRID > Q_DATA[-1]))
    exact = np.polynomial.polynomial.polyval(Q_GRID, coefficients)
    np.testing.assert_allclose(out[inside, 0], exact[inside], rtol=0, atol=1e-13)
    np.testing.assert_allclose(out[inside, 1], (1 + 2j) * exact[inside], rtol=0, atol=1e-13)
    assert np.all(out[~inside] == 0)
    if kind == "linear":                                    # and the choice matters: linear misses a cubic
        cubic = [2.0, -3.0, 5.0, -70.0]
        missed = (_to_grid(np.polynomial.polynomial.polyval(Q_DATA, cubic), Q_DATA, Q_GRID, "linear")
                  - np.polynomial.polynomial.polyval(Q_GRID, cubic))
        assert np.max(np.abs(missed[inside])) > 1e-4


def test_regrid_nearest_and_the_reconstruct_option(home, run_xpr, tmp_path):
    """nearest gives each grid point the value of the nearest data point; reconstruct regrids
    the data with the chosen interpolation when its grid differs from the data's (data.h5's
    projection_matrices are the regridded v_n)."""
    values = np.cos(40 * Q_DATA) + 1j * Q_DATA
    out = _to_grid(values, Q_DATA, Q_GRID, "nearest")
    inside = in_data_range(Q_GRID, Q_DATA)
    nearest = np.argmin(np.abs(Q_GRID[:, None] - Q_DATA[None, :]), axis=1)
    np.testing.assert_array_equal(out[inside], values[nearest[inside]])
    assert np.all(out[~inside] == 0)

    grid = build_grid(2, 32, 0.5, 8)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    data = write_invariants_file(tmp_path / "proj_data.h5", discs_2d(grid, transform), transform)
    with h5py.File(data) as h5:
        v4 = h5["data_projection_matrices/I1I1/4"][()]
    for kind in ("linear", "nearest"):
        settings = {"structure_name": f"regrid_{kind}", "dimensions": 2, "particle_radius": 150.0,
                    "n_reconstructions": 1, "input": {"invariants_file": str(data)},
                    "grid": {"max_order": 8, "n_radial_grid_points": 45},
                    "projections": {"reciprocal": {"regrid": {"interpolation": kind}}},
                    "main_loop": {"sub_loops": {"order": ["main"], "main": {"iterations": 1, "order": ["ER"],
                                                                             "methods": {"ER": {"iterations": 1}}}}},
                    "multi_process": {"n_processes": 1}, "output": {"plots": False}}
        result = run_xpr(["-q", "fxs", "reconstruct", _write(tmp_path, kind, settings)])
        assert result.exit_code == 0, result.output
        tree = load_tree(home / "data" / "fxs" / "reconstructions" / f"2d_regrid_{kind}.h5")
        q = tree["configuration"]["internal_grid"]["reciprocal_radii"]
        assert len(q) == 45 and tree["configuration"]["regrid_interpolation"] == kind
        np.testing.assert_allclose(tree["projection_matrices"]["4"], _to_grid(v4, grid.reciprocal_radii, q, kind),
                                   rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------
# bad values
# ----------------------------------------------------------------------------------------------

def _write_invariants_3d(path):
    """A small 3-D proj_data.h5 (exact invariants of Gaussian blobs)."""
    grid = build_grid(3, 12, 0.3, 6)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    centres, widths, heights = BLOBS
    constraint, _ = constraint_from_density(gaussian_blobs(grid, centres, widths, heights), transform)
    with h5py.File(path, "w") as h5:
        h5["dimensions"] = 3
        h5["max_order"] = 6
        h5["data_radial_points"] = grid.reciprocal_radii
        h5["average_intensity"] = constraint.zeroth_order / np.sqrt(4 * np.pi)
        group = h5.create_group("data_projection_matrices/I1I1")
        group.attrs["type"] = "tuple"
        for l in range(7):
            group[str(l)] = np.asarray(constraint.projection_vectors[l])
    return path


@pytest.mark.parametrize("dimensions,override,key", [
    (3, "projections.reciprocal.SO_freedom.use=true", "projections.reciprocal.SO_freedom.use"),
    (2, "projections.reciprocal.SO_freedom.use=true", None),
    (2, "projections.reciprocal.SO_freedom.order=sideways", "projections.reciprocal.SO_freedom.order"),
    (2, "projections.reciprocal.SO_freedom.order=3|projections.reciprocal.SO_freedom.use=true",
     "projections.reciprocal.SO_freedom.order"),
    (2, "projections.reciprocal.SO_freedom.radial_high_pass=1.5", "projections.reciprocal.SO_freedom.radial_high_pass"),
    (2, "projections.reciprocal.number_of_particles.search_space=[5.0, 1.0, 100]",
     "projections.reciprocal.number_of_particles.search_space"),
    (2, "projections.reciprocal.number_of_particles.search_space=[1.0, 2.0]",
     "projections.reciprocal.number_of_particles.search_space"),
    (2, "projections.reciprocal.number_of_particles.estimate=maybe",
     "projections.reciprocal.number_of_particles.estimate"),
    (2, "projections.reciprocal.regrid.interpolation=quadratic", "projections.reciprocal.regrid.interpolation"),
    (3, "projections.reciprocal.fit_metric.ER=frobenius", "projections.reciprocal.fit_metric.ER"),
    (3, "projections.reciprocal.modulus_refinement.steps=-1", "projections.reciprocal.modulus_refinement.steps"),
    (2, "projections.reciprocal.modulus_refinement.max_weight_ratio=0.5",
     "projections.reciprocal.modulus_refinement.max_weight_ratio"),
])
def test_bad_option_values_are_named(home, run_xpr, tmp_path, dimensions, override, key):
    """Bad values stop the run with exit code 2 and name the key (SO_freedom is 2-D only; in
    2-D with SO_freedom on and defaults otherwise the run is fine and only the first
    step is run here)."""
    if dimensions == 3:
        data = _write_invariants_3d(tmp_path / "proj_data_3d.h5")
    else:
        grid = build_grid(2, 16, 0.5, 6)
        transform = FourierTransformPair(grid, Backend(False, "double"))
        data = write_invariants_file(tmp_path / "proj_data.h5", discs_2d(grid, transform), transform)
    settings = {"structure_name": "bad", "dimensions": dimensions, "particle_radius": 150.0, "n_reconstructions": 1,
                "input": {"invariants_file": str(data)}, "grid": {"max_order": 6},
                "main_loop": {"sub_loops": {"order": ["main"], "main": {"iterations": 1, "order": ["ER"],
                                                                         "methods": {"ER": {"iterations": 1}}}}},
                "multi_process": {"n_processes": 1}, "output": {"plots": False, "vtk": False}}
    overrides = [item for o in override.split("|") for item in ("-o", o)]
    result = run_xpr(["fxs", "reconstruct", _write(tmp_path, "bad", settings), *overrides])
    if key is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert key in result.output
    if key.endswith("SO_freedom.use"):
        assert "2-D only" in result.output
