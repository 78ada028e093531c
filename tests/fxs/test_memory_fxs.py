"""fxs memory (xpr/fxs/memory_plan.py): each command's peak estimate against the peak traced with
tracemalloc (numpy's arrays are traced) on in-process CLI runs, within 0.7x-1.5x; a setting too
large for the memory refused with exit 2 naming the key, the estimate and the limit, before a run
folder exists; batches shrunk to fit with the same results; correlate refusing a junk frame in the
middle of a file.

The estimates count the arrays of each command's largest stage (plus, for reconstruct and
average, the figures' ~12 MB); the sizes below make those arrays most of the traced peak. A tiny
run of the same command first imports what it imports, so the traced run measures its work."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import yaml

from memory_helpers import limit_memory as limit_to, traced_peak as _traced_peak

from xpr import memory
from xpr.fxs import memory_plan

GB, MB = memory.GB, 1024 ** 2
# estimate / traced peak measured on this code (benchmarks/bench_memory.py --only-fxs, fresh
# processes): simulate_ccd 0.88-1.00, extract 0.82-1.05, correlate 0.99-1.02, reconstruct 0.97-1.19,
# average 1.00-1.16 (in a process that ran other commands first average's peak is higher: ~0.9)
LOW, HIGH = 0.7, 1.5


def traced_peak(run_xpr, args, warm=None):
    """memory_helpers.traced_peak as a fresh `xpr fxs` process collects its garbage (the fxs
    estimates were calibrated in fresh processes; docs/performance.md)."""
    return _traced_peak(run_xpr, args, warm=warm, fresh_collector=True)


SPHERE = {"shapes": {"types": ["sphere"], "centers": [[0, 0, 0]], "sizes": [50], "densities": [1],
                     "random_orientation": [False]}}
SHORT_SCHEDULE = {"sub_loops": {"order": ["main"], "main": {"iterations": 1, "order": ["HIO", "SW", "ER"],
                                                            "methods": {"HIO": {"iterations": 3},
                                                                        "SW": {"iterations": 1},
                                                                        "ER": {"iterations": 2}}}}}


def write(tmp_path, name, tree):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def one_line(result):
    return " ".join(result.output.split())


def runs(home, product, name):
    """The run folders of `name` in the product's archive (a refused run's is removed)."""
    return len(list((home / "data" / "fxs" / product / "archive" / name).glob("*/run_*")))


# ------------------------------------------------------------------ estimates against peaks

DISK = {"shapes": {"types": ["sphere"], "centers": [[0, 0]], "sizes": [50], "densities": [1],
                   "random_orientation": [False]}}


@pytest.mark.slow          # 20-40 s each on 2 shared cores (tracemalloc slows the figures)
@pytest.mark.parametrize("dimensions, n", [(2, 256), (3, 128)])
def test_simulate_ccd_and_extract_estimates_match_traced_peaks(home, run_xpr, tmp_path, dimensions, n):
    model = {"dimensions": dimensions, **(SPHERE if dimensions == 3 else DISK)}
    sim = write(tmp_path, "sim", {"structure_name": "m", **model, "grid": {"n_radial_points": n}})
    tiny = write(tmp_path, "tiny", {"structure_name": "t", **model, "grid": {"n_radial_points": 8}})
    peak = traced_peak(run_xpr, ["-q", "fxs", "simulate_ccd", sim], warm=["-q", "fxs", "simulate_ccd", tiny])
    band = memory_plan.intensity_band(0.3, 50.0, 24, dimensions)
    ratios = {f"simulate_ccd {dimensions}-D {n} q, L 24":
              memory_plan.simulate_ccd(n, 24, dimensions, band=band).bytes() / peak}
    extract = ["-q", "fxs", "extract", "tutorial", "-o", f"dimensions={dimensions}"]
    peak = traced_peak(run_xpr, extract + ["-o", "structure_name=m"], warm=extract + ["-o", "structure_name=t"])
    estimate = memory_plan.extract(n, 50, 24, dimensions, file_invariants=16 * 25 * n ** 2)
    ratios[f"extract {dimensions}-D {n} q, L 24"] = estimate.bytes() / peak
    assert all(LOW <= r <= HIGH for r in ratios.values()), ratios


def pattern_files(folder, side, frames, nan_frame=None, seed=0):
    """One HDF5 file of `frames` Poisson patterns (side x side, float32) and its pattern list;
    frame `nan_frame` all NaN (junk)."""
    rng = np.random.default_rng(seed)
    data = rng.poisson(5.0, (frames, side, side)).astype(np.float32) + 1
    if nan_frame is not None:
        data[nan_frame] = np.nan
    path = folder / f"patterns_{side}.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data, chunks=(1, side, side))
    listing = folder / f"list_{side}.txt"
    listing.write_text(f"{path}\n")
    return listing, path


def correlate_settings(tmp_path, name, listing, side, **extra):
    tree = {"structure_name": name, "dimensions": 3, "input": {"pattern_list": str(listing)},
            "detector": {"image_dimensions": [side, side], "pixel_size": 200.0, "sample_distance": 800.0,
                         "wavelength": 1.23984, "detector_origin": [(side - 1) / 2, (side - 1) / 2]},
            "grid": {"max_q": 0.1, "n_radial_points": 8}, "n_angular_points": 16, "chunk_size": 2,
            "multi_process": {"engine": "serial"}}
    for key, value in extra.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and key in tree else value
    return write(tmp_path, name, tree)


def test_correlate_estimate_matches_traced_peaks(home, run_xpr, tmp_path):
    small, _ = pattern_files(tmp_path, 32, 2)
    warm = ["-q", "fxs", "correlate", correlate_settings(tmp_path, "warm", small, 32)]
    listing, _ = pattern_files(tmp_path, 512, 4)
    ratios = {}
    for n, n_phi in [(128, 128), (8, 16)]:          # the partial sums' finish; the frames
        settings = correlate_settings(tmp_path, f"c{n}", listing, 512, grid={"n_radial_points": n},
                                      n_angular_points=n_phi)
        peak = traced_peak(run_xpr, ["-q", "fxs", "correlate", settings], warm=warm)
        estimate = memory_plan.correlate(n, n_phi, 512 * 512, frame_itemsize=4)
        ratios[f"correlate {n} q x {n_phi} angles, 512² frames"] = estimate.bytes() / peak
    assert all(LOW <= r <= HIGH for r in ratios.values()), ratios


@pytest.mark.slow          # 40-140 s on 2 shared cores (tracemalloc slows every iteration's temporaries)
def test_reconstruct_and_average_estimates_match_traced_peaks(home, run_xpr, tmp_path):
    sim = write(tmp_path, "sim", {"structure_name": "m", **SPHERE, "grid": {"n_radial_points": 64}})
    assert run_xpr(["-q", "fxs", "simulate_ccd", sim, "extract", "tutorial", "-o", "structure_name=m"]).exit_code == 0
    rec = write(tmp_path, "rec", {"structure_name": "m", "particle_radius": 60.0, "n_reconstructions": 8,
                                  "main_loop": SHORT_SCHEDULE, "multi_process": {"engine": "serial"}})
    warm = ["-q", "fxs", "reconstruct", rec, "-o", "n_reconstructions=1"]
    ratios = {}
    for batch in (8, 2):
        peak = traced_peak(run_xpr, ["-q", "fxs", "reconstruct", rec, "-o", f"multi_process.batch_size={batch}"],
                           warm=warm if batch == 8 else None)
        # default grid: L 16, n_phi 3L+2 = 50, n_theta (3L+3)//2 = 25, the data's 64 radial points
        estimate = memory_plan.reconstruct(3, 64, 16, 50, 25, 8)
        ratios[f"reconstruct 8 of 50x25x64 in batches of {batch}"] = estimate.bytes(batch) / peak
    for n in (8, 2):
        peak = traced_peak(run_xpr, ["-q", "fxs", "average", "tutorial", "-o", "structure_name=m",
                                     "-o", f"selection.n_reconstructions={n}"])
        files = list((home / "data" / "fxs" / "reconstructions").glob("3d_m.h5"))
        estimate = memory_plan.average(memory.h5_bytes(files[0]), 3, 64, 16, 50, 25, n)
        ratios[f"average {n} of 50x25x64"] = estimate.bytes(n) / peak
    assert all(LOW <= r <= HIGH for r in ratios.values()), ratios


# ------------------------------------------------------------------ refused or shrunk

def test_too_large_simulate_ccd_is_refused_before_a_run_folder(home, run_xpr, tmp_path, monkeypatch):
    limit_to(monkeypatch, 1 * GB)
    result = run_xpr(["fxs", "simulate_ccd", "tutorial", "-o", "grid.n_radial_points=2048",
                      "-o", "structure_name=big"])
    assert result.exit_code == 2, result.output
    text = one_line(result)
    estimate = memory_plan.simulate_ccd(2048, 24, 3).bytes()
    assert estimate > GB
    assert "key: grid.n_radial_points" in text and memory.size(estimate) in text and "1.00 GB (test limit)" in text
    assert not (home / "data" / "fxs" / "ccd" / "archive" / "3d_big").exists()


def test_extract_and_average_refuse_what_would_not_fit(home, run_xpr, tmp_path, monkeypatch):
    sim = write(tmp_path, "sim", {"structure_name": "m", **SPHERE, "grid": {"n_radial_points": 32}})
    rec = write(tmp_path, "rec", {"structure_name": "m", "particle_radius": 60.0, "n_reconstructions": 4,
                                  "main_loop": SHORT_SCHEDULE, "multi_process": {"engine": "serial"},
                                  "output": {"plots": False, "vtk": False}})
    assert run_xpr(["-q", "fxs", "simulate_ccd", sim, "extract", "tutorial", "-o", "structure_name=m",
                    "reconstruct", rec]).exit_code == 0
    # extract: order 24 does not fit, order 0 would: refused naming max_order
    full = memory_plan.extract(32, 50, 24, 3, file_invariants=16 * 25 * 32 ** 2)
    low = memory_plan.extract(32, 50, 0, 3, file_invariants=16 * 25 * 32 ** 2)
    limit_to(monkeypatch, (full.bytes() + low.bytes()) / 2 / memory.USABLE_FRACTION)
    result = run_xpr(["fxs", "extract", "tutorial", "-o", f"input.ccd_file={home / 'data/fxs/ccd/3d_m.h5'}",
                      "-o", "structure_name=m2"])
    assert result.exit_code == 2, result.output
    assert "key: max_order" in one_line(result) and memory.size(full.bytes()) in one_line(result)
    assert not (home / "data" / "fxs" / "invariants" / "archive" / "3d_m2").exists()   # refused in validate()
    result = run_xpr(["fxs", "extract", "tutorial", "-o", "structure_name=m"])             # the home's latest
    assert result.exit_code == 2 and "key: max_order" in one_line(result), result.output
    assert runs(home, "invariants", "3d_m") == 1                    # the first extract's, no other
    # average: 4 selected reconstructions do not fit, 2 would
    data = next((home / "data" / "fxs" / "reconstructions").glob("3d_m.h5"))
    estimate = memory_plan.average(memory.h5_bytes(data), 3, 32, 16, 50, 25, 4)
    limit_to(monkeypatch, (estimate.bytes(2) + estimate.bytes(3)) / 2 / memory.USABLE_FRACTION)
    for where in ([], ["-o", f"reconstruction_files=['{data.resolve()}']"]):     # the latest; a given file
        result = run_xpr(["fxs", "average", "tutorial", "-o", "structure_name=m",
                          "-o", "selection.n_reconstructions=4"] + where)
        assert result.exit_code == 2, result.output
        text = one_line(result)
        assert "key: selection.n_reconstructions" in text and "at most 2 reconstructions" in text
        assert runs(home, "averages", "3d_m") == 0


def test_reconstruct_shrinks_its_batches_with_the_same_results(home, run_xpr, tmp_path, monkeypatch):
    sim = write(tmp_path, "sim", {"structure_name": "m", **SPHERE, "grid": {"n_radial_points": 32}})
    assert run_xpr(["-q", "fxs", "simulate_ccd", sim, "extract", "tutorial", "-o", "structure_name=m"]).exit_code == 0
    rec = write(tmp_path, "rec", {"structure_name": "m", "particle_radius": 60.0, "n_reconstructions": 6,
                                  "main_loop": SHORT_SCHEDULE, "output": {"plots": False, "vtk": False},
                                  "multi_process": {"engine": "serial", "batch_size": 6}})
    assert run_xpr(["-q", "fxs", "reconstruct", rec]).exit_code == 0
    free = home / "data" / "fxs" / "reconstructions" / "3d_m.h5"
    with h5py.File(free) as f:
        expected = {f[f"reconstruction_results/{i}/seed"][()]: f[f"reconstruction_results/{i}/real_density"][()]
                    for i in range(6)}
    estimate = memory_plan.reconstruct(3, 32, 16, 50, 25, 6, vtk=False, plots=False)
    # room for batches of 2 but not 3: 6 reconstructions in 3 batches, the same densities
    limit_to(monkeypatch, (estimate.bytes(2) + estimate.bytes(3)) / 2 / memory.USABLE_FRACTION)
    result = run_xpr(["-q", "fxs", "reconstruct", rec])
    assert result.exit_code == 0, result.output
    log = (free.resolve().parent / "run.log").read_text()
    assert "batches of 6 reconstructions" in log and "batches of 2 instead" in log
    with h5py.File(free) as f:
        for i in range(6):
            seed = f[f"reconstruction_results/{i}/seed"][()]
            density = f[f"reconstruction_results/{i}/real_density"][()]
            np.testing.assert_allclose(density, expected[seed], atol=1e-5 * np.abs(expected[seed]).max())
    # the 6 results alone do not fit: refused naming n_reconstructions (found by the worker)
    limit_to(monkeypatch, estimate.stage_bytes("finishing") / 2)
    result = run_xpr(["fxs", "reconstruct", rec])
    assert result.exit_code == 2, result.output
    assert "key: n_reconstructions" in one_line(result)
    # the results fit, one reconstruction at work does not: refused naming the grid (by validate())
    limit_to(monkeypatch, (estimate.stage_bytes("finishing") + estimate.bytes(1)) / 2 / memory.USABLE_FRACTION)
    result = run_xpr(["fxs", "reconstruct", rec, "-o", "grid.n_radial_grid_points=32", "-o", "structure_name=m3"])
    assert result.exit_code == 2, result.output
    assert "key: grid.n_radial_grid_points" in one_line(result) and memory.size(estimate.bytes(1)) in one_line(result)
    assert not (home / "data" / "fxs" / "reconstructions" / "archive" / "3d_m3").exists()
    assert runs(home, "reconstructions", "3d_m") == 2              # the free and the shrunk run


def test_correlate_lowers_in_flight_with_the_same_result_or_refuses(home, run_xpr, tmp_path, monkeypatch):
    listing, _ = pattern_files(tmp_path, 32, 12)
    settings = correlate_settings(tmp_path, "c", listing, 32,
                                  multi_process={"engine": "local", "n_processes": 2, "in_flight": 4})
    assert run_xpr(["-q", "fxs", "correlate", settings]).exit_code == 0
    latest = home / "data" / "fxs" / "ccd" / "3d_c.h5"
    with h5py.File(latest) as f:
        expected = f["cross_correlation/I1I1"][()]
    estimate = memory_plan.correlate(8, 16, 32 * 32, workers=2, engine="local", frame_itemsize=4)
    # room for 2 held partial sums (1 per worker) but not 3
    limit_to(monkeypatch, (estimate.bytes(2) + estimate.bytes(3)) / 2 / memory.USABLE_FRACTION)
    assert run_xpr(["-q", "fxs", "correlate", settings]).exit_code == 0
    assert "1 per worker instead" in (latest.resolve().parent / "run.log").read_text()
    with h5py.File(latest) as f:
        assert np.array_equal(f["cross_correlation/I1I1"][()], expected)    # summed in chunk order
    # not even one per worker, but one process would fit: refused naming n_processes
    one = memory_plan.correlate(8, 16, 32 * 32, frame_itemsize=4)
    limit_to(monkeypatch, (one.bytes() + estimate.bytes(1)) / 2 / memory.USABLE_FRACTION)
    result = run_xpr(["fxs", "correlate", settings, "-o", "structure_name=c2"])
    assert result.exit_code == 2, result.output
    assert "key: multi_process.n_processes" in one_line(result)
    assert not (home / "data" / "fxs" / "ccd" / "archive" / "3d_c2").exists()


# ------------------------------------------------------------------ junk frames

def test_correlate_refuses_a_nan_frame_in_the_middle_of_a_file(home, run_xpr, tmp_path):
    """Frame 5 of 10 is all NaN: the first and last frame are fine, so only the check of every
    frame as it is read finds it; exit 2 naming the file and the frame, no run folder left.
    NaN pixels in an otherwise good frame are masked pixels, not junk."""
    listing, path = pattern_files(tmp_path, 32, 10, nan_frame=5)
    settings = correlate_settings(tmp_path, "junk", listing, 32)
    result = run_xpr(["fxs", "correlate", settings])
    assert result.exit_code == 2, result.output
    text = one_line(result)
    assert f"file: {path}" in text and "key: input.dataset (frame 5)" in text
    assert "no finite pattern intensities" in text
    assert runs(home, "ccd", "3d_junk") == 0                       # its run folder removed
    with h5py.File(path, "r+") as f:               # a few NaN pixels: masked, the run goes on
        frame = f["data"][5]
        frame[:] = 3.0
        frame[10:12, 10:12] = np.nan
        f["data"][5] = frame
    result = run_xpr(["-q", "fxs", "correlate", settings])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data" / "fxs" / "ccd" / "3d_junk.h5") as f:
        assert f["number_of_patterns"][()] == 10


def test_simulate_patterns_estimate_matches_the_traced_peak_and_refuses(home, run_xpr, monkeypatch):
    """Serial engine, 3-D tetrahedra on a 256² detector, chunks of 2 (4 made per batch): the
    estimate against the traced peak; then a limit below one chunk at work refused before a run
    folder, naming chunk_size."""
    base = ["-q", "fxs", "simulate_patterns", "tutorial", "-o", "multi_process.engine=serial",
            "-o", "n_patterns=8", "-o", "chunk_size=2"]
    big = ["-o", "detector.image_dimensions=[256, 256]", "-o", "detector.detector_origin=[127.5, 127.5]"]
    warm = base + ["-o", "n_patterns=1", "-o", "structure_name=warm"]
    peak = traced_peak(run_xpr, base + big + ["-o", "structure_name=big"], warm=warm)
    estimate = memory_plan.simulate_patterns(256 * 256, 2, 3, 1)
    assert LOW <= estimate.bytes(4) / peak <= HIGH, estimate.bytes(4) / peak     # measured 1.01
    limit_to(monkeypatch, 0.5 * estimate.bytes(1) / memory.USABLE_FRACTION)
    result = run_xpr(base[1:] + big + ["-o", "structure_name=refused"])
    assert result.exit_code == 2, result.output
    assert "key: chunk_size" in one_line(result) and "256x256 px in chunks of 2" in one_line(result)
    assert runs(home, "patterns", "3d_refused") == 0
