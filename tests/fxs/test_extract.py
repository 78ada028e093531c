"""Acceptance of `extract`: B_l / B_n from noise-free cross-correlations, projection matrices,
the proj_data.h5 file and bad input."""
import h5py
import numpy as np
import pytest
import yaml

from xpr.fxs.extraction import (extract_from_cc, invariants_from_projection, projection_matrices_3d,
                                projection_vectors_2d, q_limit_masks)
from xpr.fxs.grids import reciprocal_radial_points
from xpr.fxs.invariants import (average_intensity_from_invariants, deg2_invariants_2d, deg2_invariants_3d,
                                invariants_to_cc, model_intensity_coefficients)
from xpr.fxs.models import model_from_settings

LAMBDA = 1.5


def model(dims):
    centers = [(0, 0, 0), (30, 1.2, 0.4), (26, 2.0, 3.0)] if dims == 3 else [(0, 0), (30, 0.4), (26, 3.0)]
    return model_from_settings(dict(types=["tetrahedron", "cube", "sphere"], centers=centers, sizes=[16, 8, 10],
                                    densities=[1, 2, 1.5], random_orientation=[True, True, False]),
                               dims, np.random.default_rng(7))


@pytest.fixture(scope="module")
def exact():
    out = {}
    q = reciprocal_radial_points(0.35, 16)
    for dims in (2, 3):
        c = model_intensity_coefficients(model(dims), q, 16)
        out[dims] = (q, deg2_invariants_3d(c) if dims == 3 else deg2_invariants_2d(c))
    return out


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("method,wavelength", [("back_substitution", LAMBDA), ("lstsq", LAMBDA), ("legendre", None)])
def test_3d_invariants_recovered_to_1e6(exact, method, wavelength):
    q, b = exact[3]
    cc = invariants_to_cc(b, q, 3, 34, wavelength, method)          # legendre: the flat-Ewald cc
    ai = average_intensity_from_invariants(b[0], 3)
    for subtract in (True, False):
        bx = extract_from_cc(cc, q, 3, 16, method, wavelength, True, ai, subtract)
        for l in range(0, 17, 2):
            assert rel(bx[l], b[l]) < 1e-6, (method, l)
        assert np.all(bx[1::2] == 0)


def test_3d_all_orders_without_assuming_zero_odd_orders(exact):
    q, b = exact[3]
    cc = invariants_to_cc(b, q, 3, 34, LAMBDA)
    bx = extract_from_cc(cc, q, 3, 16, "back_substitution", LAMBDA, False, None, False)
    for l in range(0, 17, 2):
        assert rel(bx[l], b[l]) < 1e-6
    assert np.abs(bx[1::2]).max() < 1e-6 * np.abs(b[0]).max()        # odd B_l of a real density vanish


def test_curvature_matters(exact):
    """The flat-Ewald method applied to curved data is measurably wrong at high q (physics check)."""
    q, b = exact[3]
    cc = invariants_to_cc(b, q, 3, 34, LAMBDA)
    flat = extract_from_cc(cc, q, 3, 16, "legendre", LAMBDA, True, None, False)
    high = q > 0.25
    assert max(rel(flat[l][np.ix_(high, high)], b[l][np.ix_(high, high)]) for l in (2, 4, 6)) > 1e-2


def test_2d_invariants_recovered_to_1e6(exact):
    q, b = exact[2]
    cc = invariants_to_cc(b, q, 2, 34)
    bx = extract_from_cc(cc, q, 2, 16, "back_substitution", None, True, average_intensity_from_invariants(b[0], 2), True)
    for n in range(0, 17, 2):
        assert rel(bx[n], b[n]) < 1e-6


def test_projection_matrices_rebuild_invariants(exact):
    q, b = exact[3]
    v = projection_matrices_3d(b)
    assert [m.shape[1] for m in v] == [min(len(q), 2 * l + 1) for l in range(17)]
    rebuilt = invariants_from_projection(v)
    for l in range(0, 17, 2):
        assert rel(rebuilt[l], b[l]) < 1e-6
    q2, b2 = exact[2]
    v2 = projection_vectors_2d(b2)
    rebuilt2 = invariants_from_projection(v2)
    for n in range(0, 17, 2):
        assert rel(rebuilt2[n], b2[n]) < 1e-6


def test_q_limits_restrict_projection_matrices(exact):
    q, b = exact[3]
    masks, limits = q_limit_masks(q, 16, min_line=[[0, 0.0], [16, 0.2]])
    start = limits[8, 0, 0]
    assert q[start] >= 0.1 > q[start - 1]
    v = projection_matrices_3d(b, limits)
    assert np.all(v[8][:start] == 0)
    assert rel(invariants_from_projection(v)[8][start:, start:], b[8][start:, start:]) < 1e-6
    assert masks[8][start:, start:].all() and not masks[8][:start].any()


def write_settings(tmp_path, name, tree):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def small_ccd_settings(dims):
    centers = "[(0,0,0),(30.0,1.2,0.4)]" if dims == 3 else "[(0,0),(30.0,0.4)]"
    return {"structure_name": "small", "dimensions": dims,
            "grid": {"max_q": 0.3, "n_radial_points": 12, "max_order": 12},
            "shapes": {"types": ["sphere", "tetrahedron"], "centers": {"command": centers},
                       "sizes": [10, 14], "densities": [1, 2], "random_orientation": [False, True]},
            "cross_correlation": {"method": "back_substitution", "xray_wavelength": LAMBDA}}


@pytest.mark.parametrize("dims", [2, 3])
def test_cli_chain_writes_xframe_fields(home, run_xpr, tmp_path, dims):
    sim = write_settings(tmp_path, "sim", small_ccd_settings(dims))
    ext = write_settings(tmp_path, "ext", {"structure_name": "small", "dimensions": dims, "max_order": 12})
    result = run_xpr(["-q", "fxs", "simulate_ccd", sim, "extract", ext])
    assert result.exit_code == 0, result.output
    ccd = home / "data" / "fxs" / "ccd" / f"{dims}d_small.h5"
    proj = home / "data" / "fxs" / "invariants" / f"{dims}d_small.h5"
    with h5py.File(ccd) as f, h5py.File(proj) as g:
        b = f["deg_2_invariant/I1I1"][()]
        bx = g["deg_2_invariant/I1I1"][()]
        assert bx.dtype == np.complex128 and bx.shape == (13, 12, 12)
        for l in range(0, 13, 2):
            assert rel(bx[l], b[l]) < 1e-6
        group = g["data_projection_matrices/I1I1"]
        assert group.attrs["type"] == "tuple" and sorted(group, key=int) == [str(l) for l in range(13)]
        expected = (12, 9) if dims == 3 else (12,)
        assert group["4"].shape == expected
        for key in ("dimensions", "xray_wavelength", "max_order", "average_intensity", "data_radial_points",
                    "data_angular_points", "data_projection_matrices_q_id_limits/I1I1",
                    "deg_2_invariant_masks/I1I1", "deg_2_invariant_q_id_limits/I1I1"):
            assert key in g
        assert g["dimensions"][()] == dims and g["max_order"][()] == 12
    run_dir = proj.resolve().parent
    for png in ("invariants_abs.png", "invariants_arg.png", "invariants_from_projection.png", "invariants_mask.png"):
        assert (run_dir / png).is_file()


def test_max_order_beyond_angular_sampling_is_a_clear_error(home, run_xpr, tmp_path):
    sim = write_settings(tmp_path, "sim", small_ccd_settings(3))
    assert run_xpr(["-q", "fxs", "simulate_ccd", sim]).exit_code == 0
    ext = write_settings(tmp_path, "ext", {"structure_name": "small", "dimensions": 3, "max_order": 40})
    result = run_xpr(["-q", "fxs", "extract", ext])
    assert result.exit_code == 2
    assert "max_order" in result.output and "angular points" in result.output


def test_missing_ccd_file_is_a_clear_error(home, run_xpr, tmp_path):
    ext = write_settings(tmp_path, "ext", {"structure_name": "none", "dimensions": 3, "max_order": 4,
                                            "input": {"ccd_file": str(tmp_path / "nope.h5")}})
    result = run_xpr(["-q", "fxs", "extract", ext])
    assert result.exit_code == 2
    assert "not found" in result.output
