"""Memory of the em commands: each estimate against the peak measured with tracemalloc (numpy's
arrays are traced) on an in-process run, less the peak of a tiny run of the same command (the
libraries' own allocations); too large a run refused with exit 2 naming the key, the estimate and
the limit, before a run folder exists; what can shrink (a batch, a chunk, the streamed batches)
shrunk to fit, with the same result."""
from __future__ import annotations


import h5py
import numpy as np
import pytest

from memory_helpers import limit_memory as _limit, working_peak as _working_peak
from xpr import memory
from xpr.em.ptychography import memory_estimate, ptycho

GB = memory.GB

# estimate / measured peak must lie in [LOW, HIGH]; measured on this code (tests below, and
# benchmarks/bench_memory.py): see each test's comment
LOW, HIGH = 0.7, 1.5


def write_scan(path, scan, detector, offset_px=3):
    """A (scan, scan, detector, detector) float32 scan: a bright-field disk of radius
    detector / 5, off the centre by `offset_px` (calibration rolls it back, as for most
    detectors), its intensity tilted by a smooth phase gradient (DPC's model)."""
    y, x = np.mgrid[:scan, :scan] / scan
    g_y, g_x = np.cos(2 * np.pi * x), np.sin(2 * np.pi * y)
    k = np.arange(detector, dtype=np.float32) - detector // 2
    ky, kx = np.meshgrid(k - offset_px, k - offset_px, indexing="ij")
    disk = (np.hypot(ky, kx) <= detector / 5).astype(np.float32) * 100.0
    data = disk * (1 + 0.02 * (ky * g_y[..., None, None] + kx * g_x[..., None, None]))
    np.save(path, data.astype(np.float32))
    return path


def scan_settings(tmp_path, name, scan, detector):
    """Settings of a direct method on a written scan: 0.05 Å⁻¹ per pixel; the disk's radius
    (detector / 5 px) is the convergence angle."""
    data = write_scan(tmp_path / f"{name}.npy", scan, detector)
    conv_mrad = detector / 5 * 0.05 * 0.02508 * 1e3
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"structure_name: {name}\nexperiment:\n  data_path: {data}\n"
                    "  acc_voltage: 200.0\n  rez_pixel_size_A: 0.05\n  scan_step_A: 0.5\n"
                    f"  PLRotation_deg: 0.0\n  conv_semiangle_mrad: {conv_mrad}\nGPU:\n  use: false\n")
    return str(path)


def _settings(command, path):
    return _settings_from(["-q", "em", command, path])


# -- estimate / measured peak ------------------------------------------------------------------

# measured (tracemalloc on in-process runs take ~15-50 s each here: slow): see the report
@pytest.mark.slow
@pytest.mark.parametrize("command,scan,detector", [("dpc", 32, 64), ("wdd", 24, 48), ("tcbf", 24, 48)])
def test_direct_estimates_match_measured_peaks(home, run_xpr, tmp_path, command, scan, detector):
    tiny = scan_settings(tmp_path, "tiny", 4, detector)
    big = scan_settings(tmp_path, "big", scan, detector)
    peak = _working_peak(run_xpr, ["-q", "em", command, tiny], ["-q", "em", command, big])
    settings = _settings(command, big)
    n = scan * scan
    estimate = memory_estimate.direct_in_memory(command, n, (detector, detector), settings)
    batch = memory_estimate.wanted_chunk(command, n, settings, detector ** 2)
    ratio = estimate.bytes(batch) / peak
    assert LOW <= ratio <= HIGH, (ratio, estimate.describe(batch), peak)


@pytest.mark.slow
def test_simulate_4dstem_estimate_matches_measured_peak(home, run_xpr):
    # measured 1.0-1.2 over scan 16²-48², detector 64-128, batches 16-128
    common = ["-q", "em", "simulate_4dstem", "tutorial", "-o", "experiment.detector_size=64"]
    for scan, batch in [(32, 128), (32, 16)]:
        big = common + ["-o", f"experiment.scan_size=[{scan},{scan}]", "-o", f"simulation.batch_size={batch}"]
        peak = _working_peak(run_xpr, common + ["-o", "experiment.scan_size=[2,2]"], big)
        estimate = memory_estimate.simulate_4dstem(_settings_from(big))
        assert LOW <= estimate.bytes(batch) / peak <= HIGH, (estimate.describe(batch), peak)


def _settings_from(args):
    from xpr import registry
    from xpr.runner import prepare

    spec = registry.find("em", args[2])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    return prepare(spec, args[3], overrides).resolved.settings


# -- refused before a run folder ----------------------------------------------------------------

@pytest.mark.parametrize("command", ["dpc", "wdd", "tcbf"])
def test_direct_scan_too_large_even_streamed_is_refused(home, run_xpr, tmp_path, monkeypatch, command):
    path = scan_settings(tmp_path, "big", 16, 64)
    settings = _settings(command, path)         # (validated with the real limit)
    _limit(monkeypatch, 20_000)                 # not even one pattern's working copies
    result = run_xpr(["em", command, path])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: experiment.data_path" in text and "256 patterns of 64x64 px" in text
    streamed = memory_estimate.direct_streamed(command, 256, (64, 64), settings)
    assert f"needs about {memory.size(streamed.bytes(1))}" in text and "0.0 MB (test limit)" in text
    assert "Traceback" not in result.output
    assert not (home / "data" / "em" / command / "archive").exists()


def test_simulate_4dstem_too_large_is_refused(home, run_xpr, monkeypatch):
    args = ["em", "simulate_4dstem", "tutorial", "-o", "experiment.scan_size=[64,64]",
            "-o", "structure_name=big"]
    estimate = memory_estimate.simulate_4dstem(_settings_from(["-q"] + args))
    _limit(monkeypatch, 50 * 1024 ** 2)
    result = run_xpr(args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: experiment.scan_size" in text and memory.size(estimate.bytes(1)) in text
    assert "50.0 MB (test limit)" in text
    assert not (home / "data" / "em" / "simulate_4dstem" / "archive").exists()


def test_ptycho_too_large_is_refused_before_a_run_folder(home, run_xpr, tmp_path, monkeypatch):
    """ptycho streams a scan that does not fit in memory (tests/em/test_ptycho_stream.py); one
    whose held-out pixel bits (128 KiB here) and file blocks do not fit either is refused."""
    path = scan_settings(tmp_path, "big", 16, 64)
    _limit(monkeypatch, 0.15 * 1024 ** 2)
    result = run_xpr(["em", "ptycho", path])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: reconstruction.max_memory_GB" in text
    assert "256 patterns of 64x64 px (streamed from the file)" in text
    assert "0.1 MB (test limit)" in text
    assert not (home / "data" / "em" / "ptycho" / "archive").exists()


# -- shrunk to fit --------------------------------------------------------------------------------

@pytest.mark.slow                  # ≈ 50 s here (four traced runs)
def test_dpc_streams_when_the_scan_read_whole_would_not_fit(home, run_xpr, tmp_path, monkeypatch):
    """Room for the streamed batches, not for the scan read whole: streamed, same phase, and
    the measured peak within the limit."""
    path = scan_settings(tmp_path, "scan", 24, 48)
    assert run_xpr(["-q", "em", "dpc", path, "-o", "structure_name=whole"]).exit_code == 0
    settings = _settings("dpc", path)
    whole = memory_estimate.direct_in_memory("dpc", 576, (48, 48), settings).bytes()
    limit = whole / 2 / memory.USABLE_FRACTION
    _limit(monkeypatch, limit)
    tiny = scan_settings(tmp_path, "tiny", 4, 48)
    peak = _working_peak(run_xpr, ["-q", "em", "dpc", tiny], ["-q", "em", "dpc", path, "-o", "structure_name=streamed"])
    assert peak <= memory.USABLE_FRACTION * limit
    log = (home / "data" / "em" / "dpc" / "streamed.h5").resolve().parent / "run.log"
    assert "streamed from the file instead" in log.read_text()
    with h5py.File(home / "data/em/dpc/whole.h5") as a, h5py.File(home / "data/em/dpc/streamed.h5") as b:
        np.testing.assert_allclose(b["phase"][()], a["phase"][()], atol=1e-5 * np.abs(a["phase"][()]).max())


def test_simulate_4dstem_shrinks_its_batch(home, run_xpr, monkeypatch):
    common = ["-q", "em", "simulate_4dstem", "tutorial", "-o", "experiment.scan_size=[12,12]",
              "-o", "experiment.detector_size=32", "-o", "simulation.batch_size=64"]
    assert run_xpr(common + ["-o", "structure_name=free"]).exit_code == 0
    estimate = memory_estimate.simulate_4dstem(_settings_from(common))
    assert estimate.bytes(41) > estimate.bytes(40)          # the batch decides at this size
    _limit(monkeypatch, (estimate.bytes(40) + estimate.bytes(41)) / 2 / memory.USABLE_FRACTION)
    shrunk = run_xpr(common + ["-o", "structure_name=shrunk"])
    assert shrunk.exit_code == 0, (shrunk.output, [estimate.describe(b) for b in (8, 9)])
    log = (home / "data/em/simulate_4dstem/shrunk.h5").resolve().parent / "run.log"
    assert "40 probe positions at a time instead of simulation.batch_size 64" in log.read_text()
    with h5py.File(home / "data/em/simulate_4dstem/free.h5") as a, \
            h5py.File(home / "data/em/simulate_4dstem/shrunk.h5") as b:
        np.testing.assert_array_equal(a["data"][()], b["data"][()])


# -- simulate_focal and tie ---------------------------------------------------------------------

@pytest.mark.slow                  # ≈ 90 s here (traced runs)
def test_focal_series_estimates_match_measured_peaks(home, run_xpr):
    """simulate_focal then tie on 3 images of 256²: measured 1.0x and 1.0x (256² and 512², 3 and
    5 images: simulate_focal 1.0-1.1, tie 0.98-1.05)."""
    from xpr.em.tie import memory_estimate as focal

    sim = ["-q", "em", "simulate_focal", "tutorial"]
    tiny, big = sim + ["-o", "imaging.image_size=32", "-o", "structure_name=t"], \
        sim + ["-o", "imaging.image_size=256", "-o", "structure_name=b"]
    peak = _working_peak(run_xpr, tiny, big)
    ratio = focal.simulate_focal(_settings_from(big)).bytes() / peak
    assert LOW <= ratio <= HIGH, ratio
    tie = ["-q", "em", "tie", "tutorial"]
    peak = _working_peak(run_xpr, tie + ["-o", "structure_name=t"], tie + ["-o", "structure_name=b"])
    ratio = focal.tie(3, (256, 256), flipped=True).bytes() / peak        # the tutorial's flip series
    assert LOW <= ratio <= HIGH, ratio


def test_focal_series_too_large_is_refused(home, run_xpr, monkeypatch, tmp_path):
    from xpr.em.tie import memory_estimate as focal

    args = ["em", "simulate_focal", "tutorial", "-o", "imaging.image_size=4096", "-o", "structure_name=big"]
    estimate = focal.simulate_focal(_settings_from(["-q"] + args)).bytes()
    _limit(monkeypatch, 1 * GB)
    result = run_xpr(args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: imaging.image_size" in text and memory.size(estimate) in text and "1.00 GB (test limit)" in text
    assert not (home / "data" / "em" / "simulate_focal" / "archive").exists()
    # tie: a series of 7 images of 4096² (a dataset never written: the file stays small)
    with h5py.File(tmp_path / "series.h5", "w") as f:
        f.create_dataset("images", shape=(7, 4096, 4096), dtype=np.float32)
        f["defocus_m"] = np.linspace(-3e-6, 3e-6, 7)
    result = run_xpr(["em", "tie", "tutorial", "-o", f"input.focal_series={tmp_path / 'series.h5'}"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: input.focal_series" in text and "7 images of 4096x4096 px" in text
    assert memory.size(focal.tie(7, (4096, 4096)).bytes()) in text
    assert not (home / "data" / "em" / "tie" / "archive").exists()


# -- local_ali3d ---------------------------------------------------------------------------------

@pytest.mark.slow                  # ≈ 60 s here (traced runs)
def test_local_ali3d_estimate_matches_measured_peak(home, run_xpr):
    """One serial pass over 100 images of 32² (the tiny run: 20 images of 16²); its
    insertions are too small to split between threads.  Measured 1.28 since the compiled
    spreading loop replaced the queue of kernel contributions (peak 97.6 -> 47.3 MB; 1.49 with the
    reconstruction stage's old 180 bytes per grid point); 1.21 with the queue."""
    from xpr.em.ali3d import memory_estimate as ali3d

    common = ["-q", "em", "local_ali3d", "tutorial", "-o", "alignment.maxit=1",
              "-o", "multi_process.engine=serial"]
    peak = _working_peak(run_xpr, common + ["-o", "input.simulate.n_images=20", "-o", "input.simulate.box=16"],
                         common + ["-o", "input.simulate.n_images=100", "-o", "input.simulate.box=32"])
    ratio = ali3d.local_ali3d(100, 32).bytes(1) / peak
    assert LOW <= ratio <= HIGH, ratio


def test_local_ali3d_fewer_processes_or_refused(home, run_xpr, monkeypatch):
    from xpr.em.ali3d import memory_estimate as ali3d

    args = ["em", "local_ali3d", "tutorial", "-o", "input.simulate.box=128", "-o", "multi_process.n_processes=4",
            "-o", "structure_name=big"]
    settings = _settings_from(["-q"] + args)
    n = int(settings.input.simulate.n_images)
    from xpr import parallel
    estimate = ali3d.local_ali3d(n, 128, threads=max(1, parallel.available_cpus() // 4))
    # room for 2 workers, not 3: the plan lowers n_processes
    limit = memory.Limit(int((estimate.bytes(2) + estimate.bytes(3)) / 2 / memory.USABLE_FRACTION), "test limit")
    assert ali3d.plan(settings, limit=limit)["n_processes"] == 2
    # room for none: refused before a run folder, naming the box
    _limit(monkeypatch, estimate.bytes(1) / 2)
    result = run_xpr(args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: input.simulate.box" in text and f"{n} images of 128x128 px" in text
    assert memory.size(estimate.bytes(1)) in text
    assert not (home / "data" / "em" / "local_ali3d" / "archive").exists()


# -- ptycho: the reconstruction's estimate known before the run folder ---------------------------

@pytest.mark.slow                  # ≈ 35 s on the busy machine (a simulation and a reconstruction)
def test_ptycho_estimate_from_the_header_is_the_runs_own(home, run_xpr, monkeypatch):
    """The reconstruction estimate validate() computes from the file's header and calibration is
    the one run() computes after calibrating (its run.log line); with room for the data but not
    for the reconstruction, the run is refused before its folder exists."""
    assert run_xpr(["-q", "em", "simulate_4dstem", "tutorial", "-o", "experiment.scan_size=[6,6]",
                    "-o", "experiment.detector_size=32"]).exit_code == 0
    data = (home / "data/em/simulate_4dstem/tutorial.h5").resolve()
    args = ["-q", "em", "ptycho", "tutorial", "-o", f"experiment.data_path={data}",
            "-o", "reconstruction.epochs=1", "-o", "GPU.use=false", "-o", "structure_name=fits"]
    assert run_xpr(args).exit_code == 0
    log = (home / "data/em/ptycho/fits.h5").resolve().parent / "run.log"
    line = next(x for x in log.read_text().splitlines() if "memory: ptycho of a" in x)
    settings = _settings_from(args)
    with h5py.File(data) as f:
        calibration = dict(f.attrs)
    estimate, shape, slices = ptycho.ptycho_reconstruction(settings, 36, (32, 32), calibration)
    assert f"ptycho of a {slices}x{shape[0]}x{shape[1]} object needs about {estimate.describe(1)}" in line
    reading = memory_estimate.reading_parts(36, (32, 32), {})
    _limit(monkeypatch, (sum(reading.values()) * 1.2) / memory.USABLE_FRACTION)
    assert estimate.bytes() > sum(reading.values()) * 1.2          # the data fit, the rest does not
    result = run_xpr(args[1:-1] + ["structure_name=refused"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "key: reconstruction.max_memory_GB" in text and f"{slices}x{shape[0]}x{shape[1]} object" in text
    assert not (home / "data/em/ptycho/archive/refused").exists()
