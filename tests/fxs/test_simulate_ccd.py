"""simulate_ccd: the ccd.h5 it writes is the cross-correlation of its own exact invariants."""
import h5py
import numpy as np
import pytest
import yaml

from xpr.fxs.extraction import extract_from_cc
from xpr.fxs.invariants import average_intensity_from_invariants


def write(tmp_path, name, tree):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def settings(dims, **extra):
    centers = "[(0,0,0),(30.0,1.2,0.4),(25.0,2.5,4.0)]" if dims == 3 else "[(0,0),(30.0,0.4),(25.0,4.0)]"
    tree = {"structure_name": "sim", "dimensions": dims, "random_seed": 5,
            "grid": {"max_q": 0.25, "n_radial_points": 10, "max_order": 10},
            "shapes": {"types": ["tetrahedron", "cube", "sphere"], "centers": {"command": centers},
                       "sizes": [14, 6, 8], "densities": [1, 2, 3], "random_orientation": [True, True, False]},
            "cross_correlation": {"method": "back_substitution", "xray_wavelength": 1.2}}
    tree.update(extra)
    return tree


@pytest.mark.parametrize("dims", [2, 3])
def test_ccd_file_is_consistent_with_its_invariants(home, run_xpr, tmp_path, dims):
    result = run_xpr(["-q", "fxs", "simulate_ccd", write(tmp_path, "s", settings(dims))])
    assert result.exit_code == 0, result.output
    link = home / "data" / "fxs" / "ccd" / f"{dims}d_sim.h5"
    assert link.is_symlink() and f"archive/{dims}d_sim/" in str(link.resolve())
    with h5py.File(link) as f:
        q = f["radial_points"][()]
        cc = f["cross_correlation/I1I1"][()]
        b = f["deg_2_invariant/I1I1"][()]
        ai = f["average_intensity"][()]
        assert np.allclose(q, (np.arange(10) + 0.5) * 0.25 / 10)
        assert np.allclose(f["angular_points"][()], 2 * np.pi * np.arange(22) / 22)
        assert f["xray_wavelength"][()] == 1.2 and f["number_of_particles"][()] == 1
    assert cc.shape == (10, 10, 22) and b.shape == (11, 10, 10)
    assert np.allclose(ai, average_intensity_from_invariants(b[0], dims))
    # the cross-correlation is symmetric C(q1, q2, Δ) = C(q2, q1, −Δ) and gives back B_l
    assert np.allclose(cc, np.roll(cc.transpose(1, 0, 2)[..., ::-1], 1, axis=-1), rtol=1e-10, atol=1e-12 * np.abs(cc).max())
    bx = extract_from_cc(cc, q, dims, 10, "back_substitution", 1.2, False, ai, True)
    for l in range(11):
        assert np.linalg.norm(bx[l] - b[l]) <= 1e-6 * np.linalg.norm(b[l]) + 1e-9 * np.linalg.norm(b[0])
    run_dir = link.resolve().parent
    assert (run_dir / "model_density.vts").is_file() and (run_dir / "invariants.png").is_file()


def test_several_particles_scale_the_invariants(home, run_xpr, tmp_path):
    assert run_xpr(["-q", "fxs", "simulate_ccd", write(tmp_path, "one", settings(3))]).exit_code == 0
    with h5py.File(home / "data/fxs/ccd/3d_sim.h5") as f:
        b1 = f["deg_2_invariant/I1I1"][()]
    three = settings(3, n_particles=3, structure_name="sim3")
    assert run_xpr(["-q", "fxs", "simulate_ccd", write(tmp_path, "three", three)]).exit_code == 0
    with h5py.File(home / "data/fxs/ccd/3d_sim3.h5") as f:
        b3 = f["deg_2_invariant/I1I1"][()]
        assert f["number_of_particles"][()] == 3
    assert np.allclose(b3[0], 9 * b1[0]) and np.allclose(b3[2:], 3 * b1[2:])


def test_bad_shapes_are_clear_errors(home, run_xpr, tmp_path):
    bad = settings(3)
    bad["shapes"]["sizes"] = [14, 6]
    result = run_xpr(["-q", "fxs", "simulate_ccd", write(tmp_path, "bad", bad)])
    assert result.exit_code == 2 and "shapes.sizes" in result.output
    beyond = settings(3, grid={"max_q": 12.0, "n_radial_points": 10, "max_order": 10})
    result = run_xpr(["-q", "fxs", "simulate_ccd", write(tmp_path, "beyond", beyond)])
    assert result.exit_code == 2 and "Ewald" in result.output
