"""simulate_4dstem: conservation, dose, the truth, and the calibration it hands on."""
import h5py
import numpy as np
import pytest

from xpr.em.ptychography import calibration, potentials
from xpr.em import optics
from xpr.em.ptychography.simulate_4dstem import simulate

SMALL = dict(crystal="graphene", scan_size=(6, 5), scan_step_A=0.7, detector_size=32,
             pixel_size_A=0.3, defocus=40.0, oversampling=2)


def test_noise_free_patterns_conserve_the_electrons_on_the_detector():
    result = simulate(**SMALL)
    totals = result["data"].sum(axis=(1, 2))
    # unit probe intensity; a thin carbon sheet scatters < 1 % beyond the 1.67 Å⁻¹ detector edge
    assert np.all(totals <= 1.0 + 1e-5)
    assert np.all(totals > 0.99)


def test_dose_gives_poisson_counts_of_the_requested_mean():
    result = simulate(**SMALL, electrons_per_pattern=2.0e4, seed=3)
    data = result["data"]
    assert np.array_equal(data, np.round(data))
    assert data.sum(axis=(1, 2)).mean() == pytest.approx(2.0e4, rel=0.01)


def test_true_phase_mean_is_sigma_times_mean_projected_potential():
    """The truth's mean phase = σ · prefactor · Σ f_e(0) / area (q = 0 component, exact)."""
    result = simulate(**SMALL)
    phase = result["true_phase"].astype(np.float64)
    pixel = result["pixel_size_A"]
    area = phase.size * pixel ** 2
    box = (phase.shape[0] * pixel, phase.shape[1] * pixel)
    symbols, _ = potentials.crystal_atoms("graphene", box)
    f0 = sum(sum(potentials.PENG_PARAMETERS[s][0]) for s in symbols)
    expected = optics.interaction_constant(200.0) * potentials.POTENTIAL_PREFACTOR_V_A2 * f0 / area
    assert phase.mean() == pytest.approx(expected, rel=1e-4)


def test_cli_writes_data_that_calibration_reads_back(home, run_xpr):
    result = run_xpr(["em", "simulate_4dstem", "tutorial", "-o", "experiment.scan_size=[4,4]"])
    assert result.exit_code == 0, result.output
    path = home / "data" / "em" / "simulate_4dstem" / "tutorial.h5"
    with h5py.File(path, "r") as handle:
        assert handle["data"].shape == (16, 48, 48)
    experiment, _ = calibration.load_experiment({"data_pad": 0}, path)
    assert experiment.pixel_size_A == pytest.approx(0.3, rel=1e-9)
    assert experiment.pl_rotation_deg == 0.0
    assert experiment.probe_aberrations[0] == pytest.approx(-60.0)
