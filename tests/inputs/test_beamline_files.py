"""The beamline's files: CXI (cxidb layout, detector mask honoured), NeXus (NXdata @signal through
the @default chain), HDF5 compressed with bitshuffle-LZ4 (hdf5plugin), TIFF, EDF/CBF, MATLAB v7.3;
read back exactly, phased through the CLI, and bad files refused with exit 2 naming what is
missing. Each phase run also writes a CXI result."""
from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest

from xpr.errors import InputError
from xpr.io import read_array
from xpr.io.readers import read_pattern
from xpr.phasing import merge
from xpr.backend import cpu

from nexus_files import write_nexus


def _pattern(shape=48, diameter=18, seed=3):
    from xpr.cdi.objects import far_field_intensity, model_object
    truth = model_object("random_smooth", (shape, shape), diameter, seed=seed)
    return far_field_intensity(truth).astype(np.float32), truth


def write_cxi(path, data, mask, entry="entry_1"):
    """As cxidb writes it: the detector's data and mask, data_1/data a soft link to the data."""
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 150
        f[f"{entry}/instrument_1/detector_1/data"] = data
        f[f"{entry}/instrument_1/detector_1/mask"] = mask
        f[f"{entry}/data_1/data"] = h5py.SoftLink(f"/{entry}/instrument_1/detector_1/data")
        f[f"{entry}/sample_1/name"] = "test"
    return path


def write_mat73(path, **variables):
    """A MATLAB v7.3 file as MATLAB writes it: HDF5 with a 512-byte MATLAB header, each variable
    a root dataset in column-major order (axes reversed), complex as a (real, imag) compound."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in variables.items():
            value = np.asarray(value)
            if np.iscomplexobj(value):
                compound = np.empty(value.T.shape, dtype=[("real", "<f8"), ("imag", "<f8")])
                compound["real"], compound["imag"] = value.real.T, value.imag.T
                f[name] = compound
            else:
                f[name] = value.T
            f[name].attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as handle:
        handle.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(116))
    return path


def test_cxi_round_trip_with_detector_mask(tmp_path):
    data, _ = _pattern()
    mask = np.zeros(data.shape, np.uint8)
    mask[3, 5] = 2                      # any nonzero bit is bad
    for entry in ("entry_1", "entry_2"):
        path = write_cxi(tmp_path / f"{entry}.cxi", data, mask, entry=entry)
        back, got_mask, where = read_pattern(path)
        np.testing.assert_array_equal(back, data)
        assert got_mask.dtype == bool and got_mask.sum() == 1 and got_mask[3, 5]
        assert f"{entry}/data_1/data" in where
    # a reconstruction file: entry_1/image_1/data
    with h5py.File(tmp_path / "image.cxi", "w") as f:
        f["entry_1/image_1/data"] = data
    np.testing.assert_array_equal(read_array(tmp_path / "image.cxi"), data)


def test_nexus_signal_and_bitshuffle_lz4(tmp_path):
    data, _ = _pattern()
    path = write_nexus(tmp_path / "eiger.nxs", data, pixel_mask=(data < 0))
    with h5py.File(path) as f:     # really compressed with the bitshuffle filter (32008)
        assert "32008" in f["entry/data/data"]._filters
    back, mask, where = read_pattern(path)
    np.testing.assert_array_equal(back, data)
    assert mask is not None and not mask.any() and "entry/data/data" in where
    # the @default chain without the root attribute, and a plain .h5 suffix
    with h5py.File(path, "r+") as f:
        del f.attrs["default"]
    (tmp_path / "eiger.h5").write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_array(tmp_path / "eiger.h5"), data)


def test_named_dataset_and_mask_dataset(tmp_path):
    data, _ = _pattern()
    mask = np.zeros(data.shape, np.uint8)
    mask[0] = 1
    with h5py.File(tmp_path / "many.h5", "w") as f:
        f.create_dataset("scan/frames", data=data, **hdf5plugin.Zstd())
        f["scan/bad_pixels"] = mask
        f["scan/energy"] = np.float32(8.0)
    with pytest.raises(InputError, match="name one with input.dataset.*scan/bad_pixels"):
        read_pattern(tmp_path / "many.h5")
    back, got, _ = read_pattern(tmp_path / "many.h5", dataset="scan/frames", mask_dataset="scan/bad_pixels")
    np.testing.assert_array_equal(back, data)
    np.testing.assert_array_equal(got, mask.astype(bool))
    with pytest.raises(InputError, match="no dataset 'scan/nothing'"):
        read_pattern(tmp_path / "many.h5", dataset="scan/nothing")


def test_tiff_edf_cbf_round_trips(tmp_path):
    import fabio.cbfimage
    import fabio.edfimage
    import tifffile

    data, _ = _pattern()
    counts = np.rint(data / data.max() * 1e5).astype(np.int32)
    tifffile.imwrite(tmp_path / "p.tif", data)
    tifffile.imwrite(tmp_path / "stack.tiff", np.stack([data, 2 * data]))
    fabio.edfimage.EdfImage(data=data).write(str(tmp_path / "p.edf"))
    fabio.cbfimage.CbfImage(data=counts).write(str(tmp_path / "p.cbf"))
    np.testing.assert_array_equal(read_array(tmp_path / "p.tif"), data)
    np.testing.assert_array_equal(read_array(tmp_path / "stack.tiff")[1], 2 * data)
    np.testing.assert_array_equal(read_array(tmp_path / "p.edf"), data)
    np.testing.assert_array_equal(read_array(tmp_path / "p.cbf"), counts)


def test_matlab_v73(tmp_path):
    a = np.arange(12.0).reshape(3, 4)
    z = a + 1j * a[::-1]
    path = write_mat73(tmp_path / "v73.mat", pattern=a, field=z)
    np.testing.assert_array_equal(read_array(path, dataset="pattern"), a)
    np.testing.assert_array_equal(read_array(path, dataset="field"), z)
    with pytest.raises(InputError, match="holds \\['field', 'pattern'\\]: name one"):
        read_array(path)
    write_mat73(tmp_path / "one.mat", pattern=a)
    np.testing.assert_array_equal(read_array(tmp_path / "one.mat"), a)


# --------------------------------------------------------------------------------------------
# through the CLI


def _phase(run_xpr, path, name, *overrides):
    args = ["-q", "cdi", "phase2d", "tutorial", "-o", f"input.data_path={path}",
            "-o", f"structure_name={name}", "-o", "phasing.repeats=2"]
    for o in overrides:
        args += ["-o", o]
    return run_xpr(args)


def test_cxi_phases_with_its_mask_and_writes_a_cxi_result(home, run_xpr, tmp_path):
    """A hot pixel (1e6 x the maximum) masked in the CXI detector mask does not enter: the
    object is recovered (error < 0.05), the mask is in the run, a .cxi result is written."""
    data, truth = _pattern()
    hot = data.copy()
    hot[30, 11] = 1e6 * data.max()
    mask = np.zeros(data.shape, np.uint8)
    mask[30, 11] = 1
    path = write_cxi(tmp_path / "hot.cxi", hot, mask)
    result = _phase(run_xpr, path, "cxi")
    assert result.exit_code == 0, result.output
    main = (home / "data" / "cdi" / "phase2d" / "cxi.h5").resolve()
    with h5py.File(main) as f:
        merged = f["merged/object"][()]
        assert f["data/mask"][30, 11] == 1 and f["data/mask"][()].sum() == 1
        prtf = f["merged/prtf"][()]
    assert merge.real_space_error(merged, truth, cpu()) < 0.05
    with h5py.File(main.with_suffix(".cxi")) as f:
        assert int(f["cxi_version"][()]) == 160
        np.testing.assert_array_equal(f["entry_1/image_1/data"][()], merged.astype(np.complex64))
        np.testing.assert_array_equal(f["entry_1/data_1/data"][()], merged.astype(np.complex64))
        assert f["entry_1/image_1/mask"][()].any()
        np.testing.assert_array_equal(f["entry_1/image_1/process_1/results/prtf"][()], prtf)
        assert int(f["entry_1/image_1/process_1/configuration/phasing/repeats"][()]) == 2
        assert f["entry_1/image_1"].attrs["signal"] == "data"


def test_compressed_nexus_phases_without_a_dataset_named(home, run_xpr, tmp_path):
    data, truth = _pattern()
    path = write_nexus(tmp_path / "eiger.nxs", data)
    result = _phase(run_xpr, path, "nexus")
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data" / "cdi" / "phase2d" / "nexus.h5") as f:
        np.testing.assert_array_equal(f["data/intensity"][()], data)
        assert merge.real_space_error(f["merged/object"][()], truth, cpu()) < 0.05


def _bad_cxi_no_data(path):
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 150
        f["entry_1/instrument_1/detector_1/data"] = np.ones((8, 8))
        f["entry_1/instrument_1/detector_1/mask"] = np.zeros((8, 8), np.uint8)


def _bad_cxi_no_entry(path):
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 150
        f["data"] = np.ones((8, 8))


def _bad_nexus_signal(path):
    write_nexus(path, np.ones((8, 8), np.float32), signal="frames", compress=False)


def _bad_nexus_default(path):
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "scan"
        f["entry/data"] = np.ones((8, 8))


def _ambiguous_h5(path):
    with h5py.File(path, "w") as f:
        f["a"] = np.ones((8, 8))
        f["b"] = np.ones((8, 8))


@pytest.mark.parametrize("make, suffix, words", [
    (_bad_cxi_no_data, ".cxi", "no dataset entry_N/data_M/data or entry_N/image_M/data"),
    (_bad_cxi_no_entry, ".cxi", "no entry_1 group"),
    (_bad_nexus_signal, ".nxs", "/entry/data/@signal names 'frames'"),
    (_bad_nexus_default, ".nxs", "@default names 'scan'"),
    (_ambiguous_h5, ".h5", "holds 2 datasets"),
])
def test_bad_cxi_and_nexus_exit_2_naming_what_is_missing(home, run_xpr, tmp_path, make, suffix, words):
    path = tmp_path / f"bad{suffix}"
    make(path)
    result = _phase(run_xpr, path, "bad", "phasing.iters=5ER")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert words in text and str(path) in text
    assert not (home / "data" / "cdi" / "phase2d" / "bad.h5").exists()


def test_input_dataset_and_mask_dataset_through_the_cli(home, run_xpr, tmp_path):
    data, _ = _pattern()
    mask = np.zeros(data.shape, np.uint8)
    mask[5:7, 9] = 1
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f.create_dataset("scan/frames", data=data[None], **hdf5plugin.LZ4())
        f["scan/bad_pixels"] = mask
        f["scan/energy_keV"] = 8.0
    path = tmp_path / "scan.h5"
    result = _phase(run_xpr, path, "named", "phasing.iters=5ER")
    assert result.exit_code == 2 and "input.dataset" in result.output
    result = _phase(run_xpr, path, "named", "phasing.iters=5ER", "input.dataset=scan/frames",
                    "input.mask_dataset=scan/bad_pixels")
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data" / "cdi" / "phase2d" / "named.h5") as f:
        np.testing.assert_array_equal(f["data/mask"][()], mask)
        np.testing.assert_array_equal(f["data/intensity"][()], data)
