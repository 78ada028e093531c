"""simulate_patterns → correlate agrees with simulate_ccd within the Monte-Carlo error, and the
extraction from it recovers B_2 … B_10; Poisson noise; bad input; the same C to the last bit on
every engine; an unreadable chunk recorded and left out."""

import h5py
import numpy as np
import pytest
import yaml

from xpr.fxs.correlate import add_sums, correlate_chunk, finish, polar_geometry
from xpr.fxs.detector import Detector
from xpr.fxs.extraction import extract_from_cc
from xpr.fxs.grids import reciprocal_radial_points
from xpr.fxs.simulate_patterns import CLASSICAL_ELECTRON_RADIUS

LAMBDA = 1.5
SHAPES = {"types": ["sphere", "cube", "sphere"],
          "centers": {"command": "[(0,0,0), (15.0,1.2,0.4), (14.0,2.0,3.0)]"},
          "sizes": [8, 5, 6], "densities": [1, 2, 1.5], "random_orientation": [False, True, False]}
DETECTOR = {"image_dimensions": [64, 64], "pixel_size": 200.0, "sample_distance": 80.0,
            "wavelength": LAMBDA, "detector_origin": [31.5, 31.5]}
GRID = {"max_q": 0.3, "n_radial_points": 12}
L = 20


def write(tmp_path, name, tree):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.slow
def test_correlate_agrees_with_simulate_ccd_within_monte_carlo_error(home, run_xpr, tmp_path):
    n_patterns = 2000
    sim = write(tmp_path, "sim", {"structure_name": "mc", "dimensions": 3, "random_seed": 3, "shapes": SHAPES,
                                  "grid": {**GRID, "max_order": L},
                                  "cross_correlation": {"method": "back_substitution", "xray_wavelength": LAMBDA}})
    pat = write(tmp_path, "pat", {"structure_name": "mc", "dimensions": 3, "random_seed": 3, "shapes": SHAPES,
                                  "n_patterns": n_patterns, "chunk_size": 250, "detector": DETECTOR,
                                  "noise": {"poisson": False, "fluence": 1.0}})
    cor = write(tmp_path, "cor", {"structure_name": "mc_data", "dimensions": 3, "grid": GRID,
                                  "n_angular_points": 2 * (L + 1), "interpolation_order": 3,
                                  "input": {"patterns_file": str(home / "data/fxs/patterns/3d_mc.h5")}})
    result = run_xpr(["-q", "fxs", "simulate_ccd", sim, "simulate_patterns", pat, "correlate", cor])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/fxs/ccd/3d_mc.h5") as f:
        c_model = f["cross_correlation/I1I1"][()]
        b_model = f["deg_2_invariant/I1I1"][()]
        ai_model = f["average_intensity"][()]
    with h5py.File(home / "data/fxs/ccd/3d_mc_data.h5") as f:
        c_data = f["cross_correlation/I1I1"][()]
        ai_data = f["average_intensity"][()]
        assert f["number_of_patterns"][()] == n_patterns
    unit = CLASSICAL_ELECTRON_RADIUS ** 2          # patterns are fluence·r_e²·ΔΩ·|F|², corrected for ΔΩ
    c_data, ai_data = c_data / unit ** 2, ai_data / unit

    # Monte-Carlo error from the spread of the eight chunk cross-correlations
    files = sorted((home / "data/fxs/patterns").resolve().glob("archive/3d_mc/*/run_*/patterns_*.h5"))
    assert len(files) == 8
    q = reciprocal_radial_points(GRID["max_q"], GRID["n_radial_points"])
    detector = Detector((64, 64), 200.0, 80.0, LAMBDA, (31.5, 31.5))
    shared = {"geometry": polar_geometry(detector, q, 2 * (L + 1), True), "order": 3, "n_phi": 2 * (L + 1),
              "dataset": "data", "intensity_limits": None}
    parts = [correlate_chunk({"file": str(f), "start": 0, "stop": 250}, shared) for f in files]
    chunk_cc = np.array([finish(p, 2 * (L + 1))[0] for p in parts]) / unit ** 2
    assert np.allclose(finish(add_sums(parts), 2 * (L + 1))[0] / unit ** 2, c_data)
    standard_error = chunk_cc.std(axis=0, ddof=1) / np.sqrt(len(parts))
    deviation = np.abs(c_data - c_model)
    # within the Monte-Carlo error everywhere (4σ; the errors of all (q1, q2, Δ) move together with
    # the few thousand orientations drawn), plus 0.1 % of the peak for the polar interpolation
    assert np.all(deviation <= 4 * standard_error + 1e-3 * np.abs(c_model).max())
    chunk_ai = np.array([finish(p, 2 * (L + 1))[1] for p in parts]) / unit
    ai_error = chunk_ai.std(axis=0, ddof=1) / np.sqrt(len(parts))
    assert np.all(np.abs(ai_data - ai_model) <= 4 * ai_error + 1e-4 * ai_model.max())

    b = extract_from_cc(c_data, q, 3, L, "back_substitution", LAMBDA, True, ai_data, True)
    for l in range(2, 11, 2):
        assert rel(b[l], b_model[l]) < 0.1, l          # stated tolerance: 10 % (2000 patterns)


def test_poisson_noise_has_the_expected_mean_and_variance(home, run_xpr, tmp_path):
    # a centred sphere looks the same in every orientation: all patterns share one expectation
    shapes = {"types": ["sphere"], "centers": {"command": "[(0,0,0)]"}, "sizes": [10], "densities": [1],
              "random_orientation": [False]}
    common = {"structure_name": "ball", "dimensions": 3, "shapes": shapes, "detector": {**DETECTOR, "image_dimensions": [16, 16], "detector_origin": [7.5, 7.5]},
              "n_patterns": 400, "chunk_size": 400}
    fluence = 2.0e8
    noisy = write(tmp_path, "noisy", {**common, "noise": {"poisson": True, "fluence": fluence}})
    result = run_xpr(["-q", "fxs", "simulate_patterns", noisy])
    assert result.exit_code == 0, result.output
    link = (home / "data/fxs/patterns/3d_ball.h5").resolve()
    with h5py.File(next(link.parent.glob("patterns_*.h5"))) as f:
        counts = f["data"][()]
    assert np.allclose(counts, np.round(counts))
    from xpr.fxs.models import model_from_settings
    model = model_from_settings({**shapes, "centers": [(0, 0, 0)]}, 3)
    det = Detector((16, 16), 200.0, 80.0, LAMBDA, (7.5, 7.5))
    expected = fluence * CLASSICAL_ELECTRON_RADIUS ** 2 * det.solid_angles() * model.intensity(det.q_vectors())
    assert expected.min() > 5
    mean, var = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    assert np.all(np.abs(mean - expected) < 5 * np.sqrt(expected / len(counts)))
    assert np.allclose(var.mean() / expected.mean(), 1.0, atol=0.1)


def test_detector_origin_outside_the_image_is_a_clear_error(home, run_xpr, tmp_path):
    bad = write(tmp_path, "bad", {"structure_name": "x", "n_patterns": 2,
                                  "detector": {**DETECTOR, "detector_origin": [200.0, 10.0]}})
    result = run_xpr(["-q", "fxs", "simulate_patterns", bad])
    assert result.exit_code == 2
    assert "detector_origin" in result.output and "outside" in result.output


def test_missing_pattern_files_are_a_clear_error(home, run_xpr, tmp_path):
    listing = tmp_path / "patterns_list.txt"
    listing.write_text(f"{tmp_path / 'a.h5'}\n{tmp_path / 'b.h5'}\n")
    cor = write(tmp_path, "cor", {"structure_name": "x", "input": {"pattern_list": str(listing)},
                                  "detector": DETECTOR, "grid": GRID})
    result = run_xpr(["-q", "fxs", "correlate", cor])
    assert result.exit_code == 2
    assert "missing" in result.output


# ------------------------------------------------------------- chunks over engines, lost chunks

SMALL = {"image_dimensions": [32, 32], "pixel_size": 200.0, "sample_distance": 80.0,
         "wavelength": LAMBDA, "detector_origin": [15.5, 15.5]}
SMALL_GRID = {"max_q": 0.15, "n_radial_points": 8}     # every ring lies on the detector
N_PHI = 16


def write_pattern_files(folder, n_files=3, per_file=10, seed=0, checksum=False):
    """Far-field patterns |Σ_j exp(i q·R r_j)|² of five point scatterers in random orientations R,
    with Poisson noise, per_file in each of n_files HDF5 files (one chunk per pattern, optionally
    fletcher32-checksummed); returns the pattern_list file."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    q = Detector(tuple(SMALL["image_dimensions"]), 200.0, 80.0, LAMBDA, (15.5, 15.5)).q_vectors()
    atoms = rng.normal(scale=12.0, size=(5, 3))
    names = []
    for k in range(n_files):
        rotations = Rotation.random(per_file, random_state=rng.integers(2 ** 32)).as_matrix()
        amplitude = np.exp(1j * np.einsum("rcx,pax->prca", q, atoms @ rotations.transpose(0, 2, 1))).sum(-1)
        patterns = rng.poisson(50 * np.abs(amplitude) ** 2).astype(np.float32)
        name = folder / f"patterns_{k}.h5"
        with h5py.File(name, "w") as f:
            f.create_dataset("data", data=patterns, chunks=(1, 32, 32), fletcher32=checksum)
        names.append(name)
    listing = folder / "patterns_list.txt"
    listing.write_text("".join(f"{n}\n" for n in names))
    return listing, names


def correlate_settings(tmp_path, name, listing, **extra):
    return write(tmp_path, name, {"structure_name": name, "dimensions": 3, "input": {"pattern_list": str(listing)},
                                  "detector": SMALL, "grid": SMALL_GRID, "n_angular_points": N_PHI,
                                  "chunk_size": 4, **extra})


def small_shared():
    q = reciprocal_radial_points(SMALL_GRID["max_q"], SMALL_GRID["n_radial_points"])
    detector = Detector(tuple(SMALL["image_dimensions"]), 200.0, 80.0, LAMBDA, (15.5, 15.5))
    return {"geometry": polar_geometry(detector, q, N_PHI, True), "order": 3, "n_phi": N_PHI,
            "dataset": "data", "intensity_limits": None}


def read_latest(home, name):
    with h5py.File(home / "data/fxs/ccd" / f"3d_{name}.h5") as f:
        return f["cross_correlation/I1I1"][()], f["average_intensity"][()], int(f["number_of_patterns"][()])


def test_engines_give_bit_identical_cross_correlations(home, run_xpr, tmp_path):
    """30 patterns in 9 chunks of ≤ 4 on 1 process, 2 local processes and a 2-worker dask
    LocalCluster: the same C(q1, q2, Δ) to the last bit (partial sums added in chunk order), and
    it is the direct angular correlation ⟨I(q1, φ+Δ) I(q2, φ)⟩ over patterns and φ."""
    from xpr.fxs.correlate import sample_polar

    listing, files = write_pattern_files(tmp_path)
    cor = correlate_settings(tmp_path, "engines", listing)
    runs = {}
    for engine, overrides in [("serial", ["multi_process.engine=serial"]),
                              ("local", ["multi_process.engine=local", "multi_process.n_processes=2",
                                         "multi_process.in_flight=1"]),
                              ("dask", ["multi_process.engine=dask", "multi_process.dask.cluster.jobs=2",
                                        "multi_process.in_flight=1"])]:
        if engine == "dask":
            pytest.importorskip("distributed")
        args = ["-q", "fxs", "correlate", cor]
        for o in overrides:
            args += ["-o", o]
        result = run_xpr(args)
        assert result.exit_code == 0, result.output
        runs[engine] = read_latest(home, "engines")
    cc, average, n = runs["serial"]
    assert n == 30
    for engine, (other_cc, other_average, other_n) in runs.items():
        assert np.array_equal(other_cc, cc) and np.array_equal(other_average, average), engine
        assert other_n == 30

    shared = small_shared()
    values = []
    for name in files:
        with h5py.File(name) as f:
            for image in f["data"][()]:
                v, mask = sample_polar(image, shared["geometry"], 3)
                assert mask.all()
                values.append(v)
    values = np.array(values)                                       # (patterns, q, φ)
    direct = np.stack([np.einsum("pai,pbi->ab", np.roll(values, -d, axis=-1), values)
                       for d in range(N_PHI)], axis=-1) / (len(values) * N_PHI)
    np.testing.assert_allclose(cc, direct, rtol=1e-9)
    np.testing.assert_allclose(average, values.mean(axis=(0, 2)), rtol=1e-12)


def test_unreadable_chunk_is_recorded_and_left_out(home, run_xpr, tmp_path):
    """Pattern 5 of the second file is corrupted on disk (its checksum fails on reading), so the
    chunk of patterns 4-7 of that file fails, also when retried. With min_success above the 8 good
    chunks of 9 the run fails (exit 1) and is not linked; with min_success 8 it finishes, records
    the chunk in ccd.h5, and its C is the one of the other chunks' patterns alone."""
    listing, files = write_pattern_files(tmp_path, checksum=True)
    with h5py.File(files[1]) as f:
        info = f["data"].id.get_chunk_info_by_coord((5, 0, 0))
    with open(files[1], "r+b") as raw:
        raw.seek(info.byte_offset + 100)
        raw.write(b"\xff\x00\xff\x00")

    strict = correlate_settings(tmp_path, "lost", listing, multi_process={"engine": "serial", "min_success": 9})
    result = run_xpr(["-q", "fxs", "correlate", strict])
    assert result.exit_code == 1
    assert "only 8 of 9 tasks succeeded" in result.output
    assert not (home / "data/fxs/ccd/3d_lost.h5").exists()        # a failed run is never linked
    failed_run = next((home / "data/fxs/ccd/archive/3d_lost").glob("*/run_0"))
    assert (failed_run / "FAILED").exists() and (failed_run / "ccd.h5").exists()   # what succeeded is kept

    tolerant = correlate_settings(tmp_path, "lost", listing, multi_process={
        "engine": "local", "n_processes": 2, "retries": 2, "min_success": 8})
    result = run_xpr(["fxs", "correlate", tolerant])
    assert result.exit_code == 0, result.output
    assert "failed after 2 retries" in result.output
    cc, average, n = read_latest(home, "lost")
    assert n == 26
    from xpr.io import load_tree
    record = load_tree(home / "data/fxs/ccd/3d_lost.h5")["failed_chunks"]
    assert len(record) == 1
    assert (record[0]["file"], record[0]["first_pattern"], record[0]["last_pattern"]) == (str(files[1]), 4, 7)
    assert "OSError" in record[0]["error"]

    shared = small_shared()
    good = [{"file": str(f), "start": s, "stop": min(s + 4, 10)} for f in files for s in (0, 4, 8)
            if not (f == files[1] and s == 4)]
    expected_cc, expected_average, _ = finish(add_sums(correlate_chunk(t, shared) for t in good), N_PHI)
    np.testing.assert_allclose(cc, expected_cc, rtol=1e-12, atol=0)
    np.testing.assert_allclose(average, expected_average, rtol=1e-12, atol=0)
    everything, _, _ = finish(add_sums(correlate_chunk({"file": str(f), "start": 0, "stop": 10}, shared)
                                       for f in files if f != files[1]), N_PHI)
    assert not np.allclose(cc, everything)    # the good patterns 4, 6, 7 of the lost chunk are out too
