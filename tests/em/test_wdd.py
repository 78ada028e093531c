"""`xpr em wdd`: Wigner-distribution deconvolution of a known phase object."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.em.ptychography import wdd
from xpr.em.ptychography.calibration import Experiment

from ._direct_data import correlation, simulate, truth_on_scan_grid, write_pypty_h5, write_settings

SCAN = (24, 24)


@pytest.mark.parametrize("pl_rotation_deg, dose, minimum", [
    (0.0, None, 0.91),        # measured 0.931
    (30.0, 2e4, 0.91),        # measured 0.931, 20 000 electrons per pattern
])
def test_wdd_recovers_phase_object(pl_rotation_deg, dose, minimum):
    data = simulate(scan_size=SCAN, scan_step_A=0.3, pl_rotation_deg=pl_rotation_deg, dose=dose)
    experiment = Experiment.from_settings(data["settings"], data["patterns"])
    result = wdd.reconstruct(experiment, cpu(), wiener_epsilon=0.01, chunk_frequencies=100)
    truth = truth_on_scan_grid(data, SCAN)
    assert correlation(result["phase"], truth) >= minimum
    # a weak phase object: the amplitude stays flat (rms variation under 10 %)
    amplitude = result["amplitude"]
    assert amplitude.std() / amplitude.mean() < 0.1


@pytest.mark.parametrize("defocus_A, dose, minimum", [
    (0.0, None, 0.93),        # measured 0.940, phase rms 0.058 of the true 0.064 rad
    (50.0, 2e4, 0.90),        # aberration-corrected: 50 Å defocus, 20 000 e/pattern, measured 0.930
])
def test_ssb_recovers_weak_phase_quantitatively(defocus_A, dose, minimum):
    data = simulate(scan_size=SCAN, scan_step_A=0.3, pl_rotation_deg=30.0, defocus_A=defocus_A, dose=dose)
    experiment = Experiment.from_settings(data["settings"], data["patterns"])
    phase = wdd.reconstruct(experiment, cpu(), wiener_epsilon=0.01, method="ssb")["phase"]
    truth = truth_on_scan_grid(data, SCAN)
    assert correlation(phase, truth) >= minimum
    # SSB is linear in φ with the right scale: the rms phase (radians) within 20 % of the truth's
    assert 0.8 <= phase.std() / truth.std() <= 1.2


def test_wdd_chunking_does_not_change_the_result():
    data = simulate(scan_size=(12, 12), scan_step_A=0.3)
    experiment = Experiment.from_settings(data["settings"], data["patterns"])
    one = wdd.reconstruct(experiment, cpu(), chunk_frequencies=144)["object"]
    many = wdd.reconstruct(experiment, cpu(), chunk_frequencies=7)["object"]
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-6 * np.abs(one).max())


def test_wdd_command_end_to_end(tmp_path, home, run_xpr):
    data = simulate(scan_size=SCAN, scan_step_A=0.3, pl_rotation_deg=-15.0)
    data_file = write_pypty_h5(tmp_path / "sim.h5", data)
    settings = write_settings(tmp_path / "mine.yaml", "wdd", data_file,
                              experiment={"PLRotation_deg": "auto"})
    result = run_xpr(["em", "wdd", settings])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/wdd/test.h5", "r") as f:
        phase = f["phase"][()]
        assert f["object"].dtype == np.complex64
        assert f["pixel_size_A"][()] == pytest.approx(0.3)
    assert correlation(phase, truth_on_scan_grid(data, SCAN)) >= 0.9
