"""cdi simulate: the pattern obeys Parseval, Poisson statistics, and the mask."""
import h5py
import numpy as np

from xpr.cdi import simulate
from xpr.cdi.objects import far_field_intensity, model_object


def test_far_field_obeys_parseval_and_centring():
    obj = model_object("shapes", (40, 40), 16, seed=1, max_phase=0.7)
    intensity = far_field_intensity(obj)
    assert np.isclose(intensity.sum(), obj.size * (np.abs(obj) ** 2).sum(), rtol=1e-10)
    assert np.argmax(intensity) == np.ravel_multi_index((20, 20), (40, 40))   # centred zero frequency
    assert np.isclose(intensity[20, 20], np.abs(obj.sum()) ** 2, rtol=1e-10)


def test_photon_count_and_poisson_variance():
    intensity = np.full((200, 200), 1.0)
    counts = simulate.record(intensity, photons=2.0e5, seed=3)
    assert abs(counts.sum() - 2.0e5) < 4 * np.sqrt(2.0e5)
    assert abs(counts.var() - 5.0) < 0.3           # mean 5 photons per pixel, variance = mean


def test_beamstop_and_gaps_mask():
    masked = simulate.detector_mask((33, 33), beamstop_radius=3.0, gap_width=2, gap_offset=4)
    rows, cols = np.mgrid[0:33, 0:33]
    beamstop = np.hypot(rows - 16, cols - 16) <= 3.0
    gaps = (rows >= 19) & (rows < 21) | (cols >= 19) & (cols < 21)   # 16 + 4 - 2 // 2 = 19
    assert np.array_equal(masked, beamstop | gaps)
    assert beamstop.sum() == 29                                       # lattice points in r <= 3


def test_simulate_command_writes_pattern_mask_and_truth(home, run_xpr):
    result = run_xpr(["-q", "cdi", "simulate", "tutorial", "-o", "detector.beamstop_radius=4"])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data" / "cdi" / "simulate" / "tutorial.h5") as f:
        data, mask, truth = f["data"][()], f["mask"][()].astype(bool), f["truth/object"][()]
    assert data.shape == mask.shape == truth.shape == (64, 64)
    assert np.all(data[mask] == 0) and mask[32, 32] and mask.sum() == (np.hypot(*np.mgrid[-32:32, -32:32]) <= 4).sum()
    expected = far_field_intensity(truth.astype(np.float64))
    expected_outside = 1.0e6 * expected[~mask].sum() / expected.sum()   # tutorial: 1e6 photons
    assert abs(data.sum() - expected_outside) < 4 * np.sqrt(expected_outside)
