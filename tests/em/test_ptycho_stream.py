"""ptycho on a scan larger than its memory cap: the counts are read from the file block by block
(xpr.em.ptychography.streaming) and the reconstruction is the in-memory one."""
import h5py
import numpy as np
import pytest

from xpr import backend
from xpr.em.ptychography import calibration, ptycho
from xpr.em.ptychography.reconstruct import Options, held_out_pixels, reconstruct
from xpr.em.ptychography.simulate_4dstem import simulate
from xpr.em.ptychography.streaming import PackedHoldout

PROBE = dict(modes=1, mode_type="hermite", higher_mode_power=0.01, focal_spread_A=0.0)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    sim = simulate(crystal="MoS2", scan_size=(20, 20), scan_step_A=0.6, detector_size=48,
                   pixel_size_A=0.3, defocus=60.0, electrons_per_pattern=1.0e5)
    path = tmp_path_factory.mktemp("stream") / "scan.npy"
    np.save(path, np.asarray(sim["data"], np.float32).reshape(20, 20, 48, 48))
    return sim, path


def test_packed_holdout_is_the_in_memory_set():
    """Drawn chunk by chunk and stored as bits, the held-out set is bit for bit the one drawn
    at once (same random sequence), batch by batch."""
    shape = (37, 20, 20)
    whole = held_out_pixels(shape, 0.05, 3, np)
    packed = PackedHoldout(shape, 0.05, 3, np, chunk_patterns=8)
    assert packed.bits.nbytes == 37 * 50                      # 400 bits per pattern
    for start in range(0, 37, 10):
        assert np.array_equal(packed[start:start + 10], whole[start:start + 10])


def test_streamed_counts_give_the_in_memory_reconstruction(scan):
    """The same batches read from the file in blocks of one batch with only 3 blocks kept (so
    blocks are read again at every evaluation): the object after 6 epochs is identical to the
    in-memory reconstruction's."""
    sim, path = scan
    settings = dict(sim["calibration"], scan_size=None, data_path=str(path), data_pad=8)
    objects, reads = [], None
    for stream_GB in (None, 1e-4):
        experiment, _ = calibration.load_experiment(settings, memory_GB=stream_GB)
        assert experiment.streamed == (stream_GB is not None)
        options = Options(epochs=6, probe_from_epoch=2)
        model, counts, mask, params, options = ptycho.prepare(experiment, options, PROBE, backend.cpu(),
                                                     memory_GB=1e-3, stream_GB=stream_GB)
        params, history = reconstruct(model, counts, params, options, mask=mask)
        objects.append(params["object"])
        if stream_GB is not None:
            blocks = -(-400 // counts.block_patterns)
            assert counts.block_patterns == options.batch_size and blocks > counts.cached_blocks
            reads = counts.blocks_read
            assert reads >= 6 * blocks                    # re-read at every evaluation
    assert np.array_equal(objects[0], objects[1])


def _run_ptycho(run_xpr, sim, path, cap):
    c = sim["calibration"]
    options = ["-o", f"experiment.data_path={path}", "-o", f"experiment.acc_voltage={c['acc_voltage']}",
               "-o", f"experiment.conv_semiangle_mrad={c['conv_semiangle_mrad']}",
               "-o", f"experiment.rez_pixel_size_A={c['rez_pixel_size_A']}",
               "-o", "experiment.scan_step_A=0.6", "-o", "experiment.defocus=60.0",
               "-o", "experiment.PLRotation_deg=0", "-o", "reconstruction.epochs=8",
               "-o", f"reconstruction.max_memory_GB={cap}"]
    return run_xpr(["em", "ptycho", "tutorial"] + options)


def test_cli_streams_a_scan_that_does_not_fit_in_memory(home, run_xpr, scan):
    """max_memory_GB 0.01 (8.7 MB usable; the 400 patterns need 10.5 MB read and calibrated
    whole): ptycho streams them, says so, and returns the in-memory result (to 1e-4: the smaller
    batches sum in another order)."""
    sim, path = scan
    assert _run_ptycho(run_xpr, sim, path, "null").exit_code == 0
    with h5py.File(home / "data/em/ptycho/tutorial.h5", "r") as handle:
        whole = handle["object"][()]
    result = _run_ptycho(run_xpr, sim, path, 0.01)
    assert result.exit_code == 0, result.output
    log = ((home / "data/em/ptycho/tutorial.h5").resolve().parent / "run.log").read_text()
    assert "streamed from the file" in log and "counts read from the file in blocks" in log
    with h5py.File(home / "data/em/ptycho/tutorial.h5", "r") as handle:
        streamed = handle["object"][()]
    assert np.abs(streamed - whole).max() < 1e-4 * np.abs(whole).max()
