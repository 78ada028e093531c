"""fxs average: reconstructions in different frames are brought back together and averaged."""
from __future__ import annotations

import datetime

import numpy as np
import pytest
import yaml

from xpr.backend import Backend
from xpr.fxs.alignment import centre, euler_to_matrix, relative_error, rigid_motion
from xpr.fxs.grids import build_grid
from xpr.fxs.grids import gaussian_blobs as blobs
from xpr.fxs.transforms import FourierTransformPair
from xpr.io.h5 import load_tree, save_tree


def xframe_layout(field, dimensions):
    return np.moveaxis(field, -1, 0) if dimensions == 2 else np.transpose(field, (2, 1, 0))


def write_reconstructions(path, grid, densities, errors):
    """A data.h5 as reconstruct writes it (only what average reads)."""
    d = grid.dimensions
    config = {"internal_grid": {"real_radii": grid.real_radii, "reciprocal_radii": grid.reciprocal_radii,
                                "phis": grid.phis,
                                **({"thetas": grid.thetas, "theta_weights": grid.theta_weights} if d == 3 else {})},
              "dimensions": d, "max_order": grid.max_order}
    results = {str(i): {"real_density": xframe_layout(rho, d), "last_real_density": xframe_layout(rho, d),
                        "final_error": float(e)} for i, (rho, e) in enumerate(zip(densities, errors))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tree(path, {"configuration": config, "reconstruction_results": results})


@pytest.mark.parametrize("dimensions", [2, 3])
def test_average_of_moved_copies_is_the_particle(home, run_xpr, tmp_path, dimensions):
    """Copies of one particle, each turned, shifted and (half of them) inverted / mirrored, with
    a little noise: average finds every frame (relative L2 distances small), the average equals
    the particle, the PRTF stays near 1; files are found by `{today}` paths relative to
    data/fxs/reconstructions/."""
    backend = Backend(False, "double")
    if dimensions == 2:
        grid = build_grid(2, 40, 0.4, 32)
        model = blobs(grid, [(0, 0), (45, 5), (-15, 35)], [16, 10, 9], [1.0, 2.0, 1.5])
    else:
        grid = build_grid(3, 24, 0.25, 12)
        model = blobs(grid, [(0, 0, 0), (80, 0, 0), (-30, 60, 20), (10, -30, 70)], [30, 20, 20, 18],
                      [1.0, 1.6, 0.8, 1.2])                   # chiral: inversion is not a rotation
    transform = FourierTransformPair(grid, backend)
    reference, _ = centre(model, grid, transform)
    reference /= reference.max()
    rng = np.random.default_rng(5)
    copies = [reference]
    for k in range(3):
        if dimensions == 2:
            a = rng.uniform(0, 2 * np.pi)
            motion = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.diag([1.0, (-1.0) ** k])
        else:
            motion = euler_to_matrix(*rng.uniform(0, np.pi, 3)) * (-1.0) ** k
        moved = rigid_motion(reference, grid, rotation=motion, shift=rng.uniform(-15, 15, dimensions), order=3)
        copies.append(moved + 0.01 * rng.standard_normal(moved.shape) * (moved > 0.05))
    today = datetime.date.today().strftime("%d_%m_%Y")
    # the same xFrame-style name finds a file beside it (2-D) or in xpr's run archive (3-D)
    folder = home / "data" / "fxs" / "reconstructions" / ("archive" if dimensions == 3 else "")
    write_reconstructions(folder / f"{dimensions}d_copies" / today / "run_0" / "data.h5", grid, copies,
                          [1e-3, 2e-3, 3e-3, 4e-3])
    settings = {"structure_name": "copies", "dimensions": dimensions,
                "reconstruction_files": [f"{dimensions}d_copies/{{today}}/run_0/data.h5"],
                "find_rotation": {"max_order": 10}, "output": {"vtk": dimensions == 3}}
    (tmp_path / "avg.yaml").write_text(yaml.safe_dump(settings))

    result = run_xpr(["-q", "fxs", "average", tmp_path / "avg.yaml"])
    assert result.exit_code == 0, result.output

    link = home / "data" / "fxs" / "averages" / f"{dimensions}d_copies.h5"
    tree = load_tree(link)
    assert np.all(tree["alignment"]["l2_distance_to_reference"] < 0.1)   # resampling + 1 % noise
    assert list(tree["alignment"]["inverted"]) == [False, False, True, False]
    average = np.moveaxis(tree["average"]["real_density"], 0, -1) if dimensions == 2 else \
        np.transpose(tree["average"]["real_density"], (2, 1, 0))
    assert relative_error(average, reference, grid) < 0.05
    assert np.min(tree["resolution_metrics"]["PRTF"][grid.reciprocal_radii < 0.5 * grid.max_q]) > 0.9
    run = link.resolve().parent
    assert (run / "PRTF.png").is_file()
    from matplotlib.image import imread
    picture = imread(run / "average.png")                   # slices of the average: 1 (2-D) or 3 panels
    assert picture.shape[1] > (2.5 if dimensions == 3 else 0.9) * picture.shape[0]
    if dimensions == 3:
        assert (run / "vtk" / "real_average.vts").is_file() and (run / "vtk" / "reciprocal_average.vts").is_file()


SPHERES_3D = {
    "simulate_ccd": {"structure_name": "spheres", "dimensions": 3,
                     "grid": {"max_q": 0.2, "n_radial_points": 64, "max_order": 31},
                     "shapes": {"types": ["sphere"] * 3,
                                "centers": {"command": "[(0,0,0), (90.0,np.pi/3,0.0), (90.0,2*np.pi/3,np.pi/2)]"},
                                "sizes": [60, 40, 40], "densities": [30, 50, 20],
                                "random_orientation": [False] * 3},
                     "cross_correlation": {"method": "back_substitution", "xray_wavelength": 1.5}},
    "extract": {"structure_name": "spheres", "dimensions": 3, "max_order": 31},
    "reconstruct": {"structure_name": "spheres", "dimensions": 3, "particle_radius": 150.0, "n_reconstructions": 4,
                    "grid": {"max_order": 31},
                    "projections": {"real": {"shrink_wrap": {"sigmas": [20.0, 10.0], "thresholds": [0.08, 0.08]}}},
                    "main_loop": {"sub_loops": {
                        "order": ["main", "refinement"],
                        "main": {"iterations": 6, "order": ["HIO", "SW", "ER"],
                                 "methods": {"HIO": {"iterations": 40}, "SW": {"iterations": 1},
                                             "ER": {"iterations": 10}}},
                        "refinement": {"iterations": 1, "order": ["ER"], "methods": {"ER": {"iterations": 30}}}}},
                    "multi_process": {"batch_size": 2}},
    "average": {"structure_name": "spheres", "dimensions": 3, "find_rotation": {"max_order": 12}},
}


@pytest.mark.slow
def test_3d_chain_average_correlates_with_the_particle(home, run_xpr, tmp_path):
    """xFrame's three-sphere particle at a reduced grid (64 radial points, max_order 31):
    simulate_ccd -> extract -> reconstruct (4 starts) -> average; the average of the accepted
    reconstructions correlates >= 0.9 with the particle."""
    args = ["-q", "fxs"]
    for command, settings in SPHERES_3D.items():
        path = tmp_path / f"{command}.yaml"
        path.write_text(yaml.safe_dump(settings))
        args += [command, path]
    result = run_xpr(args)
    assert result.exit_code == 0, result.output

    from xpr.fxs.alignment import align
    from xpr.fxs.average import grid_from_configuration
    from xpr.fxs.models import model_from_settings

    tree = load_tree(home / "data" / "fxs" / "averages" / "3d_spheres.h5")
    grid = grid_from_configuration(tree["configuration"])
    transform = FourierTransformPair(grid, Backend(False, "double"))
    ccd_run = (home / "data" / "fxs" / "ccd" / "3d_spheres.h5").resolve().parent
    ccd_settings = yaml.safe_load((ccd_run / "settings.yaml").read_text())
    model = model_from_settings(ccd_settings["shapes"], 3, np.random.default_rng(ccd_settings["random_seed"]))
    reference, _ = centre(model.density(grid.cartesian_points("real")), grid, transform)
    average = np.transpose(tree["average"]["real_density"], (2, 1, 0))
    _, info = align(average, reference, transform, search_order=12)
    assert info.correlation >= 0.9


def test_average_reads_array_job_shares(home, run_xpr, tmp_path):
    """The merge step of an array job: every reconstruct run recorded in the shares folder is
    averaged (here two shares, each a copy of the particle in another frame)."""
    backend = Backend(False, "double")
    grid = build_grid(2, 40, 0.4, 32)
    model = blobs(grid, [(0, 0), (45, 5), (-15, 35)], [16, 10, 9], [1.0, 2.0, 1.5])
    reference, _ = centre(model, grid, FourierTransformPair(grid, backend))
    reference /= reference.max()
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    shares = tmp_path / "shares"
    shares.mkdir()
    for index, density in enumerate([reference, rigid_motion(reference, grid, rotation=turn, shift=[8.0, -5.0], order=3)]):
        run = tmp_path / f"share_{index}" / "run_0"
        write_reconstructions(run / "data.h5", grid, [density], [1e-3 * (index + 1)])
        (shares / f"task_{index}.runs").write_text(f"fxs reconstruct {run} {run / 'data.h5'}\n")
    (tmp_path / "avg.yaml").write_text(yaml.safe_dump({"structure_name": "shares", "dimensions": 2,
                                                       "output": {"vtk": False}}))
    result = run_xpr(["-q", "fxs", "average", tmp_path / "avg.yaml", "-o", f"input.shares_dir={shares}"])
    assert result.exit_code == 0, result.output
    tree = load_tree(home / "data" / "fxs" / "averages" / "2d_shares.h5")
    assert len(tree["alignment"]["l2_distance_to_reference"]) == 2      # both shares found
    assert np.all(tree["alignment"]["l2_distance_to_reference"] < 0.1)
    average = np.moveaxis(tree["average"]["real_density"], 0, -1)
    assert relative_error(average, reference, grid) < 0.05
    result = run_xpr(["-q", "fxs", "average", tmp_path / "avg.yaml", "-o", f"input.shares_dir={tmp_path / 'nowhere'}"])
    assert result.exit_code == 2 and "shares folder not found" in result.output


@pytest.mark.parametrize("dimensions", [2, 3])
def test_central_slices_are_the_density_on_the_planes(dimensions):
    """average.png shows central_slices: an off-centre Gaussian's slices equal the analytic
    Gaussian on the planes z = 0, y = 0, x = 0: to 0.03 (linear interpolation on a 10.5 Å radial
    grid) beyond the first radial cell; inside it (r < dr/2, no grid point) resample takes the
    innermost shell's value, 5 Å away (0.095 measured at the origin)."""
    from xpr.fxs.average import central_slices

    grid = build_grid(dimensions, 48, 0.3, 24)
    centre_ = np.array([20.0, -15.0, 10.0][:dimensions])
    density = blobs(grid, [centre_], [25.0], [1.0])
    extent, planes = central_slices(density, grid, n_points=41, extent=60.0)
    xs = np.linspace(-extent, extent, 41)
    a, b = np.meshgrid(xs, xs, indexing="xy")
    axes = {"x": 0, "y": 1, "z": 2}
    assert [label for label, _ in planes] == (["xy"] if dimensions == 2 else ["xy", "xz", "yz"])
    for label, values in planes:
        point = np.zeros(a.shape + (dimensions,))
        point[..., axes[label[0]]], point[..., axes[label[1]]] = a, b
        exact = np.exp(-np.sum((point - centre_) ** 2, -1) / (2 * 25.0 ** 2))
        inner = np.linalg.norm(point, axis=-1) < grid.dr
        assert np.abs(values - exact)[~inner].max() < 0.03, label
        assert np.abs(values - exact)[inner].max() < 0.1, label
