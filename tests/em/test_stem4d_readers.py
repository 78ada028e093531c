"""4D-STEM readers (xpr.io.stem4d): small files of each format written here, read back exactly,
lazily, with the calibration they carry; a py4DSTEM file and a compressed NeXus file through
`em dpc` with only the optics the file lacks."""
import datetime
import re
import shutil
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from xpr.errors import InputError
from xpr.io.stem4d import NpyFile, open_scan

from ._direct_data import correlation, simulate, truth_on_scan_grid


def _cube(scan=(3, 4), detector=(6, 5), seed=0):
    return np.random.default_rng(seed).integers(0, 1000, scan + detector).astype(np.uint16)


def _check_batches(scan, cube):
    flat = cube.reshape((-1,) + cube.shape[-2:])
    assert scan.shape == cube.shape and scan.n_patterns == len(flat)
    np.testing.assert_array_equal(scan.read(5, 11), flat[5:11])         # across scan rows
    got = np.concatenate([batch for _, batch in scan.batches(5)])
    np.testing.assert_array_equal(got, flat)


def write_py4dstem(path, cube, r_size=0.5, r_units="A", q_size=0.05, q_units="A^-1",
                   rotation_deg=0.0, flip=False, semiangle=None):
    """An EMD 1.0 file as py4DSTEM 0.14 (emdfile) writes a DataCube (layout read from a file
    py4DSTEM.save wrote): root attrs, <root>/datacube/{data, dim0..3},
    <root>/metadatabundle/calibration/{R_pixel_size, R_pixel_units, Q_pixel_size, …}."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"emd_group_type": "file", "version_major": 1, "version_minor": 0,
                        "authoring_program": "emdfile"})
        root = f.create_group("datacube_root")
        root.attrs.update({"emd_group_type": "root", "python_class": "Root"})
        cube_group = root.create_group("datacube")
        cube_group.attrs.update({"emd_group_type": "array", "python_class": "DataCube"})
        cube_group.create_dataset("data", data=cube)
        for i, (name, units, step) in enumerate((("Rx", r_units, r_size), ("Ry", r_units, r_size),
                                                 ("Qx", q_units, q_size), ("Qy", q_units, q_size))):
            dim = cube_group.create_dataset(f"dim{i}", data=np.array([0.0, step]))
            dim.attrs.update({"name": name, "units": units})
        calibration = root.create_group("metadatabundle").create_group("calibration")
        calibration.attrs.update({"emd_group_type": "metadata", "python_class": "Calibration"})
        values = {"R_pixel_size": r_size, "R_pixel_units": r_units, "Q_pixel_size": q_size,
                  "Q_pixel_units": q_units, "QR_rotation_degrees": rotation_deg,
                  "QR_rotation": np.radians(rotation_deg), "QR_flip": flip}
        if semiangle is not None:
            values["convergence_semiangle_mrad"] = semiangle
        for key, value in values.items():
            calibration[key] = value.encode() if isinstance(value, str) else value
    return path


def write_nexus(path, cube, scan_step_nm, q_step_inv_nm, compression=True):
    """NeXus: /entry (@default) → /entry/scan (NXdata, @signal counts, @axes with units);
    the counts bitshuffle+LZ4 compressed as detector software writes them."""
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs.update({"NX_class": "NXentry", "default": "scan"})
        nxdata = entry.create_group("scan")
        nxdata.attrs.update({"NX_class": "NXdata", "signal": "counts",
                             "axes": ["y", "x", "ky", "kx"]})
        options = hdf5plugin.Bitshuffle(cname="lz4") if compression else {}
        nxdata.create_dataset("counts", data=cube, chunks=(1, 1) + cube.shape[2:], **options)
        for name, size, step, units in (("y", cube.shape[0], scan_step_nm, "nm"),
                                        ("x", cube.shape[1], scan_step_nm, "nm"),
                                        ("ky", cube.shape[2], q_step_inv_nm, "1/nm"),
                                        ("kx", cube.shape[3], q_step_inv_nm, "1/nm")):
            axis = nxdata.create_dataset(name, data=(np.arange(size) - size // 2) * step)
            axis.attrs["units"] = units
        f.create_group("entry/instrument").create_dataset("other", data=np.zeros((2, 2, 2)))
    return path


def write_mib(path, cube, flyback_ms=5.0):
    """Quantum Detectors Merlin .mib, by hand: per frame a 384-byte ASCII header
    (MQ1,seq,00384,chips,width,height,U16,layout,…,ISO time stamp,exposure ns,depth,) and the
    big-endian U16 frame stored upside down (RosettaSciIO flips the rows back). Time stamps
    jump at each scan line, from which the reader finds the line length."""
    ny, nx, h, w = cube.shape
    start = datetime.datetime(2024, 1, 1, 10, 0, 0)
    with open(path, "wb") as f:
        for index in range(ny * nx):
            iy, ix = divmod(index, nx)
            stamp = start + datetime.timedelta(milliseconds=index + iy * flyback_ms)
            fields = ["MQ1", f"{index + 1:06d}", "00384", "01", f"{w:04d}", f"{h:04d}", "U16",
                      "   1x1", "01", stamp.strftime("%Y-%m-%d %H:%M:%S.%f"), "0.001000", "0",
                      "0", "0", "1.000000E+1", "5.110000E+2", stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")
                      + "000Z", "1000000ns", "12", ""]
            header = ",".join(fields).encode().ljust(384, b" ")
            f.write(header)
            f.write(cube[iy, ix, ::-1].astype(">u2").tobytes())
    return path


# ---------------------------------------------------------------------------------------------

def test_npy_is_read_in_batches(tmp_path):
    cube = _cube()
    np.save(tmp_path / "scan.npy", cube)
    with open_scan(tmp_path / "scan.npy") as scan:
        assert isinstance(scan.data, NpyFile)                    # nothing read yet
        _check_batches(scan, cube)
        assert scan.calibration == {"scan_size": [3, 4]}
    flat = cube.reshape(12, 6, 5)
    np.save(tmp_path / "stack.npy", flat)
    with open_scan(tmp_path / "stack.npy") as scan:
        assert scan.scan_shape is None
        np.testing.assert_array_equal(scan.read(2, 7), flat[2:7])


def test_py4dstem_file_and_its_calibration(tmp_path):
    cube = _cube()
    path = write_py4dstem(tmp_path / "p4.h5", cube, r_size=0.05, r_units="nm", q_size=0.4,
                          q_units="1/nm", rotation_deg=12.0, semiangle=21.0)
    with open_scan(path) as scan:
        assert isinstance(scan.data, h5py.Dataset)                   # not read yet
        _check_batches(scan, cube)
        assert scan.calibration["scan_step_A"] == pytest.approx(0.5)
        assert scan.calibration["rez_pixel_size_A"] == pytest.approx(0.04)
        assert scan.calibration["conv_semiangle_mrad"] == pytest.approx(21.0)
        assert scan.calibration["PLRotation_deg"] == pytest.approx(12.0)
        assert scan.calibration["transposed"] is False
        assert "Q_pixel_size" in scan.sources["rez_pixel_size_A"]
    path = write_py4dstem(tmp_path / "mrad.h5", cube, q_size=0.8, q_units="mrad")
    with open_scan(path) as scan:
        assert scan.calibration["rez_pixel_size_mrad"] == pytest.approx(0.8)
        assert "rez_pixel_size_A" not in scan.calibration


def test_compressed_nexus_with_axis_units(tmp_path):
    cube = _cube(scan=(4, 3), detector=(8, 8))
    path = write_nexus(tmp_path / "scan.nxs", cube, scan_step_nm=0.03, q_step_inv_nm=0.5)
    with h5py.File(path, "r") as f:                            # really compressed by a plugin
        assert f["entry/scan/counts"]._filters
    with open_scan(path) as scan:
        assert scan.where.endswith("/entry/scan/counts")
        _check_batches(scan, cube)
        assert scan.calibration["scan_step_A"] == pytest.approx(0.3)
        assert scan.calibration["rez_pixel_size_A"] == pytest.approx(0.05)


def test_named_dataset_and_ambiguous_files(tmp_path):
    cube = _cube()
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a/patterns"] = cube
        f["b/other"] = cube[..., :3]
    with pytest.raises(InputError) as error:
        open_scan(tmp_path / "two.h5")
    assert error.value.key == "experiment.dataset" and "a/patterns" in error.value.message
    with open_scan(tmp_path / "two.h5", dataset="/a/patterns") as scan:
        _check_batches(scan, cube)
    with pytest.raises(InputError) as error:
        open_scan(tmp_path / "two.h5", dataset="/missing")
    assert "missing" in error.value.message
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["data"] = np.zeros((5, 5))
    with pytest.raises(InputError, match="3-D"):
        open_scan(tmp_path / "flat.h5")


def test_merlin_mib_written_by_hand(tmp_path):
    cube = _cube(scan=(3, 4), detector=(8, 8))
    path = write_mib(tmp_path / "scan.mib", cube)
    with open_scan(path, scan_size=[3, 4]) as scan:
        _check_batches(scan, cube)
    with open_scan(path) as scan:                      # line length from the time stamps
        assert scan.scan_shape == (3, 4)
        _check_batches(scan, cube)


def _write_dpc_settings(path, data_path, **experiment):
    lines = ["structure_name: test", "experiment:", f"  data_path: {data_path}"]
    lines += [f"  {key}: {value}" for key, value in experiment.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["py4dstem", "nexus"])
def test_dpc_reads_the_calibration_from_the_file(tmp_path, home, run_xpr, kind):
    """The scan step and detector pixel come from the file (py4DSTEM calibration group, NeXus
    axis units); only the voltage (and, for NeXus, the rotation) are given. The log says which
    value came from where, the calibration used is the file's, and the phase correlates with
    the truth (r ≥ 0.9)."""
    scan = (24, 24)
    data = simulate(scan_size=scan)
    cube = data["patterns"].reshape(scan + data["patterns"].shape[1:])
    step, rez = data["settings"]["scan_step_A"], data["rez"]
    if kind == "py4dstem":
        path = write_py4dstem(tmp_path / "scan.h5", cube, r_size=step, q_size=rez,
                              semiangle=data["settings"]["conv_semiangle_mrad"])
        extra = {}
    else:
        path = write_nexus(tmp_path / "scan.nxs", cube, scan_step_nm=step / 10,
                           q_step_inv_nm=rez * 10)
        extra = {"PLRotation_deg": 0.0}
    settings = _write_dpc_settings(tmp_path / "mine.yaml", path, acc_voltage=200.0, **extra)
    result = run_xpr(["em", "dpc", str(settings)])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/dpc/test.h5", "r") as f:
        assert f["calibration/scan_step_A"][()] == pytest.approx(step)
        assert f["calibration/rez_pixel_size_A"][()] == pytest.approx(rez)
        phase = f["phase"][()]
    log = (home / "data/em/dpc/test.h5").resolve().parent.joinpath("run.log").read_text()
    assert re.search(r"acc_voltage = 200\.0 from settings", log)
    assert re.search(r"scan_step_A = [0-9.]+ from data file", log)
    assert correlation(phase, truth_on_scan_grid(data, scan)) >= 0.9


PY4DSTEM_FILE = Path(__file__).resolve().parents[1] / "data" / "py4dstem" / "dpc_scan_16x16.h5"


def test_dpc_on_a_file_py4dstem_wrote(tmp_path, home, run_xpr):
    """A file written by py4DSTEM 0.14.16 itself (tests/data/py4dstem, see its README), not by
    xpr's idea of the layout: `em dpc` with only the voltage (py4DSTEM's calibration has no key
    for it) takes the scan step, detector pixel, convergence angle and rotation from the file's
    calibration, and the phase correlates with the truth of the simulation the file holds."""
    path = shutil.copy(PY4DSTEM_FILE, tmp_path / "from_py4dstem.h5")
    data = simulate(scan_size=(16, 16))
    with open_scan(path) as scan:
        assert scan.shape == (16, 16, 32, 32)
        stored = scan.read(0, 256).astype(np.float64)
    # the file holds the simulated patterns as counts, scaled to a maximum of 60000 and rounded;
    # 1 count, not 0.5: another numpy's float32 rounding of the simulation moves values that sat
    # on a .5 boundary to the other integer (0.516 with the lowest declared versions)
    expected = data["patterns"] / data["patterns"].max() * 60000
    np.testing.assert_allclose(stored, expected, atol=1.0)
    settings = _write_dpc_settings(tmp_path / "mine.yaml", path, acc_voltage=200.0)
    result = run_xpr(["em", "dpc", str(settings)])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/dpc/test.h5", "r") as f:
        assert f["calibration/scan_step_A"][()] == pytest.approx(data["settings"]["scan_step_A"])
        assert f["calibration/rez_pixel_size_A"][()] == pytest.approx(data["rez"], rel=1e-6)
        phase = f["phase"][()]
    log = (home / "data/em/dpc/test.h5").resolve().parent.joinpath("run.log").read_text()
    for key in ("scan_step_A", "rez_pixel_size_A", "conv_semiangle_mrad", "PLRotation_deg"):
        assert re.search(rf"{key} = \S+ from data file", log), key
    assert correlation(phase, truth_on_scan_grid(data, (16, 16))) >= 0.9


def test_streamed_dpc_equals_the_in_memory_one(tmp_path, home, run_xpr):
    """A memory budget far below the data: patterns streamed from an HDF5 file in batches of
    a few patterns. The PL rotation fitted from the streamed centres of mass and the DPC phase
    equal the in-memory ones (float32 sums in another order: 1e-4 rad, 0.01°); the data are
    off-centre by 2 px so the re-centring is streamed too."""
    from xpr.backend import cpu
    from xpr.em.ptychography import dpc
    from xpr.em.ptychography.calibration import Experiment

    scan = (16, 16)
    data = simulate(scan_size=scan, pl_rotation_deg=20.0)
    cube = np.roll(data["patterns"], (2, -1), axis=(1, 2)).reshape(scan + (32, 32))
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=cube, chunks=(1, 4, 32, 32))
    settings = dict(data["settings"], PLRotation_deg="auto", scan_size=None)
    memory = 4 * 3 * 32 * 32 * 4 / 1e9             # batches of three patterns (4 work copies)
    with open_scan(path) as opened:
        streamed = Experiment.from_settings(settings, opened, memory_GB=memory)
        assert streamed.streamed and streamed.patterns.batch_size == 3
        assert streamed.center_shift_px == (-2, 1)
        phase_streamed = dpc.reconstruct(streamed, cpu())["phase"]
        patterns_streamed = np.asarray(streamed.patterns)
    whole = Experiment.from_settings(settings, cube)
    assert not whole.streamed
    assert streamed.pl_rotation_deg == pytest.approx(whole.pl_rotation_deg, abs=0.01)
    np.testing.assert_allclose(phase_streamed, dpc.reconstruct(whole, cpu())["phase"], atol=1e-4)
    np.testing.assert_array_equal(patterns_streamed, whole.patterns)
    assert correlation(phase_streamed, truth_on_scan_grid(data, scan)) >= 0.9

    config = _write_dpc_settings(tmp_path / "mine.yaml", path, acc_voltage=200.0,
                                 scan_step_A=data["settings"]["scan_step_A"],
                                 rez_pixel_size_A=data["rez"], PLRotation_deg="auto")
    result = run_xpr(["em", "dpc", str(config), "-o", f"dpc.max_memory_GB={memory}"])
    assert result.exit_code == 0, result.output
    log = (home / "data/em/dpc/test.h5").resolve().parent.joinpath("run.log").read_text()
    assert "256 patterns streamed from the file in batches of 3" in log


def test_streamed_tcbf_equals_the_in_memory_one(tmp_path):
    """tcBF from a file streamed in batches of five patterns: the bright-field images, the
    fitted defocus and the phase equal the in-memory ones."""
    from xpr.backend import cpu
    from xpr.em.ptychography import tcbf
    from xpr.em.ptychography.calibration import Experiment

    scan = (16, 16)
    data = simulate(scan_size=scan, defocus_A=100.0)
    path = tmp_path / "scan.npy"
    np.save(path, data["patterns"].reshape(scan + (32, 32)))
    settings = dict(data["settings"], scan_size=None)
    with open_scan(path) as opened:
        streamed = Experiment.from_settings(settings, opened, memory_GB=4 * 5 * 32 * 32 * 4 / 1e9)
        assert streamed.streamed and streamed.patterns.batch_size == 5
        images_streamed, k_streamed = tcbf.bright_field_images(streamed)
        result_streamed = tcbf.reconstruct(streamed, cpu())
    whole = Experiment.from_settings(data["settings"], data["patterns"])
    images, k = tcbf.bright_field_images(whole)
    np.testing.assert_array_equal(images_streamed, images)
    np.testing.assert_array_equal(k_streamed, k)
    result = tcbf.reconstruct(whole, cpu())
    assert result_streamed["defocus_A"] == pytest.approx(result["defocus_A"], rel=1e-6)
    np.testing.assert_allclose(result_streamed["phase"], result["phase"], atol=1e-5)
    assert abs(result["defocus_A"] - 100.0) <= 10.0
