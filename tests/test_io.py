"""I/O round trips: HDF5 trees (xFrame layout), VTK grids, input readers."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.io

from xpr.errors import InputError
from xpr.io import load_tree, read_array, save_tree, save_vts


def test_h5_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "object": (rng.normal(size=(4, 5)) + 1j * rng.normal(size=(4, 5))).astype(np.complex64),
        "n": 3, "beta": 0.8, "name": "tutorial", "flag": True, "nothing": None,
        "ragged": [np.zeros(2), np.ones(3)], "pair": (1.5, "a"),
        "nested": {"deep": {"x": np.arange(6).reshape(2, 3)}},
        "grid": [1.0, 2.0, 3.0],
    }
    back = load_tree(save_tree(tmp_path / "t.h5", tree))
    np.testing.assert_array_equal(back["object"], tree["object"])
    assert back["object"].dtype == np.complex64
    assert back["n"] == 3 and back["beta"] == 0.8 and back["name"] == "tutorial" and back["flag"]
    assert back["nothing"] is None
    assert isinstance(back["ragged"], list) and back["ragged"][1].tolist() == [1, 1, 1]
    assert back["pair"] == (1.5, "a")
    np.testing.assert_array_equal(back["nested"]["deep"]["x"], tree["nested"]["deep"]["x"])
    np.testing.assert_array_equal(back["grid"], [1.0, 2.0, 3.0])


def test_reads_xframe_files(xframe_data):
    tree = load_tree(xframe_data / "proj_data_3d.h5")
    assert int(tree["dimensions"]) == 3
    bl = tree["deg_2_invariant"]["I1I1"]
    assert np.iscomplexobj(bl) and bl.shape[1] == bl.shape[2] == 32
    # B_l is Hermitian in (q1, q2) by construction: an invariant a file must honour
    np.testing.assert_allclose(bl[2], bl[2].conj().T, rtol=1e-6, atol=1e-6 * np.abs(bl[2]).max())


def test_vts_cartesian_and_spherical(tmp_path):
    import pyvista

    field = np.arange(24, dtype=float).reshape(2, 3, 4)
    mesh = pyvista.read(save_vts(tmp_path / "c.vts", field, spacing=(1.0, 2.0, 3.0)))
    assert mesh.n_points == 24
    np.testing.assert_allclose(np.sort(mesh.point_data["density"]), np.arange(24))
    r, theta, phi = np.array([1.0, 2.0]), np.array([0.5, 1.0, 2.0]), np.linspace(0, 2 * np.pi, 4, endpoint=False)
    mesh = pyvista.read(save_vts(tmp_path / "s.vts", {"rho": field}, grid="spherical", axes=(r, theta, phi)))
    radii = np.linalg.norm(mesh.points, axis=1)
    assert set(np.round(radii, 5)) == {1.0, 2.0}


def test_readers(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    a.tofile(tmp_path / "a.bin")
    scipy.io.savemat(tmp_path / "a.mat", {"pattern": a})
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["entry/data"] = a
    for name, kwargs in [("a.npy", {}), ("a.bin", {"shape": (3, 4)}), ("a.mat", {}),
                         ("a.h5", {"dataset": "entry/data"}), ("a.h5", {})]:
        np.testing.assert_array_equal(read_array(tmp_path / name, **kwargs), a)
    with pytest.raises(InputError, match="shape"):
        read_array(tmp_path / "a.bin", shape=(5, 5), key="input.data_path")
    with pytest.raises(InputError, match="not found"):
        read_array(tmp_path / "missing.npy")
    with pytest.raises(InputError, match="expected \\[4, 3\\]"):
        read_array(tmp_path / "a.npy", shape=(4, 3))


def test_mrc_reader(tmp_path):
    import mrcfile

    volume = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    with mrcfile.new(tmp_path / "v.mrc") as mrc:
        mrc.set_data(volume)
    np.testing.assert_array_equal(read_array(tmp_path / "v.mrc"), volume)
