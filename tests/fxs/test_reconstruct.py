"""fxs reconstruct: densities phased from invariants match the particle they came from."""
from __future__ import annotations

import copy
import datetime

import h5py
import numpy as np
import pytest
import yaml

from xpr.backend import Backend
from xpr.fxs.alignment import align, centre, relative_error
from xpr.fxs.grids import build_grid
from xpr.fxs.real_space import gaussian_blur
from xpr.fxs.transforms import FourierTransformPair
from xpr.io.h5 import load_tree

SCHEDULE_2D = {"sub_loops": {"order": ["main", "refinement"],
                             "main": {"iterations": 6, "order": ["HIO", "SW", "ER"],
                                      "methods": {"HIO": {"iterations": 60}, "SW": {"iterations": 1},
                                                  "ER": {"iterations": 20}}},
                             "refinement": {"iterations": 1, "order": ["ER"],
                                            "methods": {"ER": {"iterations": 100}}}}}


def discs_2d(grid, transform, blur=8.0):
    """xFrame's three-disc particle (radii 60, 40, 40 Å; densities 30, 50, 20), smoothed to the
    resolution of the grid so that it is representable on it."""
    x = grid.cartesian_points("real")
    rho = np.zeros(x.shape[:-1])
    for (r, phi), radius, density in zip([(0, 0), (90, 0), (90, 2 * np.pi / 3)], [60, 40, 40], [30, 50, 20]):
        c = np.array([r * np.cos(phi), r * np.sin(phi)])
        rho += density * (np.sum((x - c) ** 2, -1) <= radius ** 2)
    return np.clip(gaussian_blur(rho[:, None, :], transform, blur)[:, 0, :], 0, None)


def write_invariants_file(path, density, transform):
    """proj_data.h5 (xFrame's fields) holding the exact 2-D invariants of a density: v_n = I_n."""
    grid = transform.grid
    intensity = np.abs(transform.forward(density[:, None, :])) ** 2
    coefficients = transform.real_harmonic_coefficients(intensity)[:, 0, :]
    with h5py.File(path, "w") as h5:
        h5["dimensions"] = 2
        h5["max_order"] = grid.max_order
        h5["xray_wavelength"] = 1.0
        h5["data_radial_points"] = grid.reciprocal_radii
        h5["average_intensity"] = coefficients[0].real
        group = h5.create_group("data_projection_matrices/I1I1")
        group.attrs["type"] = "tuple"
        for n in range(grid.max_order + 1):
            group[str(n)] = coefficients[int(np.flatnonzero(transform.ms == n)[0])]
        limits = np.tile([0, grid.n_radial], (grid.max_order + 1, 1))
        h5["data_projection_matrices_q_id_limits/I1I1"] = limits
    return path


def densities_of(data_file, dimensions):
    tree = load_tree(data_file)
    results = tree["reconstruction_results"]
    order = sorted(results, key=int)
    to_internal = (lambda f: np.moveaxis(f, 0, -1)) if dimensions == 2 else (lambda f: np.transpose(f, (2, 1, 0)))
    return [to_internal(results[k]["real_density"]) for k in order], [results[k]["final_error"] for k in order], tree


@pytest.mark.slow
def test_2d_reconstructions_recover_the_particle(home, run_xpr, tmp_path):
    """Exact invariants of a 2-D particle: at least half of 8 reconstructions are within 0.1
    (normalised L2) of the particle after alignment, and their invariants match the data."""
    grid = build_grid(2, 64, 0.5, 32)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    model = discs_2d(grid, transform)
    data = write_invariants_file(tmp_path / "proj_data.h5", model, transform)
    settings = {"structure_name": "discs", "dimensions": 2, "particle_radius": 150.0, "n_reconstructions": 8,
                "input": {"invariants_file": str(data)}, "grid": {"max_order": 32},
                "projections": {"real": {"shrink_wrap": {"sigmas": [20.0, 6.0]}}},
                "main_loop": copy.deepcopy(SCHEDULE_2D), "multi_process": {"batch_size": 4}}
    settings["main_loop"]["sub_loops"]["main"]["iterations"] = 15
    (tmp_path / "discs.yaml").write_text(yaml.safe_dump(settings))

    result = run_xpr(["-q", "fxs", "reconstruct", tmp_path / "discs.yaml"])
    assert result.exit_code == 0, result.output

    link = home / "data" / "fxs" / "reconstructions" / "2d_discs.h5"
    densities, errors, tree = densities_of(link, 2)
    assert errors == sorted(errors)
    reference, _ = centre(model, grid, transform)
    distances = [relative_error(align(d, reference, transform)[0], reference, grid) for d in densities]
    assert sum(e <= 0.1 for e in distances) >= 4, distances
    best = tree["reconstruction_results"]["0"]
    assert np.nanmedian(best["invariant_mismatch"][2:20:2]) < 0.05
    run = link.resolve().parent
    for name in ("error_metrics.png", "first_Bl.png", "N_out_Bl.png", "pics/reconstruction_0.png", "settings.yaml"):
        assert (run / name).is_file(), name


def test_reads_xframe_proj_data(home, run_xpr, tmp_path, xframe_data):
    """xFrame's own proj_data_2d.h5 (three discs): the best reconstruction correlates with the
    particle after alignment (xFrame's unitary transform only rescales the density)."""
    settings = {"structure_name": "xframe", "dimensions": 2, "particle_radius": 150.0, "n_reconstructions": 4,
                "input": {"invariants_file": str(xframe_data / "proj_data_2d.h5")},
                "grid": {"max_order": 16}, "main_loop": SCHEDULE_2D, "multi_process": {"batch_size": 4},
                "output": {"plots": False}}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(settings))
    result = run_xpr(["-q", "fxs", "reconstruct", tmp_path / "x.yaml"])
    assert result.exit_code == 0, result.output
    densities, _, tree = densities_of(home / "data" / "fxs" / "reconstructions" / "2d_xframe.h5", 2)
    config = tree["configuration"]["internal_grid"]
    grid = build_grid(2, len(config["real_radii"]), float(config["reciprocal_radii"][-1] + config["reciprocal_radii"][0]), 16)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    model = discs_2d(grid, transform, blur=1e-6)
    reference, _ = centre(model, grid, transform)
    _, info = align(densities[0], reference, transform)
    assert info.correlation > 0.9


def test_bad_inputs_are_named(home, run_xpr, xframe_data, tmp_path):
    wrong_dims = run_xpr(["fxs", "reconstruct", "tutorial_2d", "-o",
                          f"input.invariants_file={xframe_data / 'proj_data_3d.h5'}"])
    assert wrong_dims.exit_code == 2
    assert "3-D" in wrong_dims.output and "dimensions" in wrong_dims.output

    too_high = run_xpr(["fxs", "reconstruct", "tutorial_2d", "-o",
                        f"input.invariants_file={xframe_data / 'proj_data_2d.h5'}", "-o", "grid.max_order=20"])
    assert too_high.exit_code == 2
    assert "grid.max_order" in too_high.output and "16" in too_high.output

    ml = run_xpr(["fxs", "reconstruct", "tutorial_2d", "-o",
                  f"input.invariants_file={xframe_data / 'proj_data_2d.h5'}",
                  "-o", "main_loop.sub_loops.refinement.order=[ML]",
                  "-o", "main_loop.sub_loops.refinement.methods={ML: {iterations: 10}}"])
    assert ml.exit_code == 2      # cdi's Poisson likelihood step has no counts to fit here
    assert "needs measured counts" in ml.output and "main_loop" in ml.output

    missing = run_xpr(["fxs", "reconstruct", "tutorial_2d", "-o", f"input.invariants_file={tmp_path / 'nope.h5'}"])
    assert missing.exit_code == 2 and "nope.h5" in missing.output

    today = datetime.date.today().strftime("%d_%m_%Y")
    no_file = run_xpr(["fxs", "average", "tutorial_2d", "-o", "reconstruction_files=['2d_tutorial/{today}/run_7/data.h5']"])
    assert no_file.exit_code == 2
    assert f"2d_tutorial/{today}/run_7/data.h5" in no_file.output


@pytest.mark.slow
def test_2d_tutorial_chain(home, run_xpr):
    """simulate_ccd -> extract -> reconstruct -> average on the 2-D tutorial particle (six
    triangles): at least half of the 8 reconstructions are within 0.1 of the particle at the data's
    resolution (both blurred by a Gaussian of width pi/max_q) after alignment, and the average
    correlates with it."""
    result = run_xpr(["-q", "fxs", "simulate_ccd", "tutorial_2d", "extract", "tutorial_2d",
                      "reconstruct", "tutorial_2d", "average", "tutorial_2d"])
    assert result.exit_code == 0, result.output
    from xpr.fxs.models import model_from_settings

    ccd_run = (home / "data" / "fxs" / "ccd" / "2d_tutorial.h5").resolve().parent
    ccd_settings = yaml.safe_load((ccd_run / "settings.yaml").read_text())
    model = model_from_settings(ccd_settings["shapes"], 2, np.random.default_rng(ccd_settings["random_seed"]))
    densities, _, tree = densities_of(home / "data" / "fxs" / "reconstructions" / "2d_tutorial.h5", 2)
    config = tree["configuration"]["internal_grid"]
    q = config["reciprocal_radii"]
    grid = build_grid(2, len(q), float(q[-1] + q[0]), int(tree["configuration"]["max_order"]))
    transform = FourierTransformPair(grid, Backend(False, "double"))
    reference, _ = centre(model.density(grid.cartesian_points("real")), grid, transform)

    def at_resolution(f):
        return gaussian_blur(f[:, None, :], transform, np.pi / grid.max_q)[:, 0, :]

    errors = [relative_error(at_resolution(align(d, reference, transform)[0]), at_resolution(reference), grid)
              for d in densities]
    assert sum(e <= 0.1 for e in errors) >= 4, errors
    average = load_tree(home / "data" / "fxs" / "averages" / "2d_tutorial.h5")
    mean = np.moveaxis(average["average"]["real_density"], 0, -1)
    _, info = align(mean, reference, transform)
    assert info.correlation > 0.9


def test_lost_batches_are_recorded_and_left_out(home, run_xpr, tmp_path, monkeypatch):
    """A batch that fails after its retries is logged and recorded (failed_seeds in data.h5); the
    other batches' reconstructions are kept, each with its own seed, when min_success allows, and
    the run fails when it does not. The kept reconstructions are bit for bit those of an
    undisturbed run with the same seeds."""
    from xpr import parallel
    from xpr.fxs import reconstruct

    grid = build_grid(2, 32, 0.5, 8)
    transform = FourierTransformPair(grid, Backend(False, "double"))
    data = write_invariants_file(tmp_path / "proj_data.h5", discs_2d(grid, transform), transform)
    settings = {"structure_name": "lost", "dimensions": 2, "particle_radius": 150.0, "n_reconstructions": 6,
                "random_seed": 3, "input": {"invariants_file": str(data)}, "grid": {"max_order": 8},
                "main_loop": {"sub_loops": {"order": ["main"], "main": {"iterations": 1, "order": ["ER"],
                                                                         "methods": {"ER": {"iterations": 30}}}}},
                "multi_process": {"batch_size": 2, "n_processes": 1, "retries": 0, "min_success": 0.5},
                "output": {"plots": False}}
    (tmp_path / "lost.yaml").write_text(yaml.safe_dump(settings))
    phase_batch = reconstruct._phase_batch

    def lose_second_batch(task):
        if task["first"] == 2:
            raise MemoryError("worker lost")
        return phase_batch(task)

    monkeypatch.setattr(reconstruct, "_phase_batch", lose_second_batch)
    result = run_xpr(["fxs", "reconstruct", tmp_path / "lost.yaml"])
    assert result.exit_code == 0, result.output
    tree = load_tree(home / "data" / "fxs" / "reconstructions" / "2d_lost.h5")
    seeds = parallel.task_seeds(3, 6)
    assert sorted(int(s) for s in tree["failed_seeds"]) == sorted(seeds[2:4])
    results = tree["reconstruction_results"]
    assert len(results) == 4
    assert sorted(int(r["seed"]) for r in results.values()) == sorted(seeds[:2] + seeds[4:])
    strict = run_xpr(["fxs", "reconstruct", tmp_path / "lost.yaml", "-o", "multi_process.min_success=1.0"])
    assert strict.exit_code == 1
    # the kept reconstructions are exactly those of an undisturbed run with the same seeds
    monkeypatch.setattr(reconstruct, "_phase_batch", phase_batch)
    whole = run_xpr(["fxs", "reconstruct", tmp_path / "lost.yaml", "-o", "structure_name=whole"])
    assert whole.exit_code == 0, whole.output
    undisturbed = {int(r["seed"]): r["real_density"] for r in
                   load_tree(home / "data" / "fxs" / "reconstructions" / "2d_whole.h5")["reconstruction_results"].values()}
    assert len(undisturbed) == 6
    for r in results.values():
        np.testing.assert_array_equal(r["real_density"], undisturbed[int(r["seed"])])
    run = (home / "data" / "fxs" / "reconstructions" / "2d_lost.h5").resolve().parent
    assert "worker lost" in (run / "run.log").read_text()


def test_piped_reconstruct_draws_no_bars(home, run_xpr):
    """Output to a pipe or a file (CliRunner's stderr is no terminal): the reconstructions' own
    progress bars stay off, so a batch job's log holds no carriage-return lines (issue 15)."""
    result = run_xpr(["fxs", "simulate_ccd", "tutorial_2d", "extract", "tutorial_2d",
                      "reconstruct", "tutorial_2d", "-o", "multi_process.engine=serial",
                      "-o", "n_reconstructions=2", "-o", "multi_process.batch_size=2"])
    assert result.exit_code == 0, result.output
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "\r" not in text and "reconstructions 0-1" not in text
