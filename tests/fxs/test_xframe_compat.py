"""xpr reads xFrame's ccd.h5 files, agrees with the exact invariants stored in them, and writes
proj_data.h5 files laid out as xFrame's."""
import h5py
import numpy as np
import pytest
import yaml

from xpr.fxs.cross_correlation import read_ccd
from xpr.fxs.extraction import extract_from_cc, invariants_from_projection, projection_matrices_3d
from xpr.fxs.invariants import invariants_to_cc


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("method", ["back_substitution", "lstsq"])
def test_3d_extraction_matches_xframe_exact_invariants(xframe_data, method):
    data = read_ccd(xframe_data / "ccd_3d.h5")
    with h5py.File(xframe_data / "ccd_3d.h5") as f:
        exact = f["deg_2_invariant/I1I1"][()]
    b = extract_from_cc(data["cross_correlation"], data["radial_points"], 3, 16, method,
                        data["xray_wavelength"], True, data["average_intensity"], True)
    for l in range(0, 17, 2):                       # including the Nyquist order 16 of 32 angles
        assert rel(b[l], exact[l]) < 1e-6


def test_2d_extraction_matches_xframe_exact_invariants(xframe_data):
    data = read_ccd(xframe_data / "ccd_2d.h5")
    assert len(data["angular_points"]) == data["cross_correlation"].shape[-1] + 1   # xFrame's extra point
    with h5py.File(xframe_data / "ccd_2d.h5") as f:
        exact = f["deg_2_invariant/I1I1"][()]
    b = extract_from_cc(data["cross_correlation"], data["radial_points"], 2, 16, "back_substitution",
                        None, True, data["average_intensity"], True)
    for n in range(0, 16, 2):
        assert rel(b[n], exact[n]) < 1e-6
    # order 16 is the Nyquist order of 32 angles: a real cross-correlation keeps only Re B_16 there
    assert rel(b[16].real, exact[16].real) < 1e-6


def test_xpr_cross_correlation_reproduces_xframe_file(xframe_data):
    for dims in (2, 3):
        data = read_ccd(xframe_data / f"ccd_{dims}d.h5")
        with h5py.File(xframe_data / f"ccd_{dims}d.h5") as f:
            exact = f["deg_2_invariant/I1I1"][()]
        cc = invariants_to_cc(exact, data["radial_points"], dims, 32, data["xray_wavelength"])
        assert np.abs(cc - data["cross_correlation"]).max() < 1e-12 * np.abs(cc).max()


def test_projection_matrices_agree_with_xframe(xframe_data):
    with h5py.File(xframe_data / "proj_data_3d.h5") as g:
        b_xframe = g["deg_2_invariant/I1I1"][()]
        v_xframe = [g[f"data_projection_matrices/I1I1/{l}"][()] for l in range(17)]
    v = projection_matrices_3d(b_xframe)
    for l in range(0, 17, 2):
        assert v[l].shape == v_xframe[l].shape
        # V_l is defined up to a unitary on the right: compare V_l V_l†
        assert rel(invariants_from_projection([v[l]])[0], invariants_from_projection([v_xframe[l]])[0]) < 1e-8


@pytest.mark.parametrize("dims", [2, 3])
def test_extract_cli_on_xframe_file_has_xframe_layout(home, run_xpr, tmp_path, xframe_data, dims):
    settings = {"structure_name": "shared", "dimensions": dims, "max_order": 16,
                "input": {"ccd_file": str(xframe_data / f"ccd_{dims}d.h5")}}
    path = tmp_path / "ext.yaml"
    path.write_text(yaml.safe_dump(settings))
    result = run_xpr(["-q", "fxs", "extract", path])
    assert result.exit_code == 0, result.output
    ours = home / "data" / "fxs" / "invariants" / f"{dims}d_shared.h5"
    with h5py.File(ours) as f, h5py.File(xframe_data / f"proj_data_{dims}d.h5") as g:
        def layout(h):
            items = {}
            h.visititems(lambda name, obj: items.setdefault(
                name, (obj.shape, obj.dtype.kind) if isinstance(obj, h5py.Dataset) else dict(obj.attrs).get("type")))
            return items
        mine, theirs = layout(f), layout(g)
        # every field xFrame writes is there with the same shape (projection matrices of odd orders,
        # zero by assumption, are stored complex by xpr)
        for name, (info) in theirs.items():
            assert name in mine, name
            if isinstance(info, tuple):
                assert mine[name][0] == info[0], name
        b_xframe = g["deg_2_invariant/I1I1"][()]
        b = f["deg_2_invariant/I1I1"][()]
        for l in range(0, 16, 2):
            assert rel(b[l], b_xframe[l]) < 1e-6
        assert np.allclose(f["average_intensity"][()], g["average_intensity"][()])
