"""`xpr em tcbf`: defocus, rotation and phase from tilt-corrected bright field."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.em.ptychography import tcbf
from xpr.em.ptychography.calibration import Experiment

from ._direct_data import (correlation, simulate, truth_on_fine_scan_grid, write_pypty_h5,
                           write_settings)

SCAN = (32, 32)


def _blind(settings):
    """The settings as a user who does not know the defocus gives them."""
    return dict(settings, defocus=0.0, aberrations=[0.0])


@pytest.mark.parametrize("defocus_A, pl_rotation_deg, dose", [
    (100.0, 0.0, None),       # measured: 104.1 Å, −0.02°, phase r = 0.874
    (-120.0, 25.0, 1e4),      # over-focus, rotated scan, 10 000 e/pattern: −122.4 Å, 25.01°, r = 0.852
])
def test_tcbf_recovers_defocus_rotation_and_phase(defocus_A, pl_rotation_deg, dose):
    data = simulate(scan_size=SCAN, defocus_A=defocus_A, pl_rotation_deg=pl_rotation_deg, dose=dose)
    # the calibrated PL rotation is off by 3°: the fit must find the true one
    settings = dict(_blind(data["settings"]), PLRotation_deg=pl_rotation_deg + 3.0)
    experiment = Experiment.from_settings(settings, data["patterns"])
    result = tcbf.reconstruct(experiment, cpu(), upsample=2)
    assert result["defocus_A"] == pytest.approx(defocus_A, rel=0.10)
    assert result["pl_rotation_deg_fitted"] == pytest.approx(pl_rotation_deg, abs=1.0)
    # the phase, CTF-corrected, against the truth on the same grid (4-pixel border left out)
    truth = truth_on_fine_scan_grid(data, Experiment.from_settings(data["settings"], data["patterns"]), 2)
    inner = (slice(4, -4), slice(4, -4))
    assert correlation(result["phase"][inner], truth[inner]) >= 0.8


def test_tcbf_recovers_two_fold_astigmatism():
    data = simulate(scan_size=SCAN, defocus_A=100.0, pl_rotation_deg=10.0,
                    aberrations=(0.0, 20.0, -15.0))
    experiment = Experiment.from_settings(_blind(data["settings"]), data["patterns"])
    c10, c12a, c12b = tcbf.reconstruct(experiment, cpu(), fit_aberrations=3)["aberrations_fitted"]
    assert -c10 == pytest.approx(100.0, rel=0.10)          # measured 105.3 Å
    assert c12a == pytest.approx(20.0, abs=3.0)             # measured 18.3 Å
    assert c12b == pytest.approx(-15.0, abs=3.0)            # measured −14.0 Å


def test_shift_model_is_the_aberration_gradient():
    """The fitted model on exact model shifts returns the coefficients and the rotation."""
    rng = np.random.default_rng(0)
    k = rng.uniform(-0.8, 0.8, size=(60, 2))
    basis = tcbf.shift_basis(k, 0.025, 3)
    # pure defocus: d = −λ C10 k
    np.testing.assert_allclose(basis[0], -0.025 * k, rtol=1e-6)
    truth = np.array([-80.0, 12.0, -5.0])
    shifts = tcbf.model_shifts_A(basis, truth, np.array([0.1, -0.2]), 17.0)
    theta, coefficients, offset = tcbf.fit_shift_model(shifts, basis, 10.0, fit_rotation=True)
    assert theta == pytest.approx(17.0, abs=1e-3)
    np.testing.assert_allclose(coefficients, truth, rtol=1e-5)


def test_shift_and_sum_of_unshifted_images_is_their_mean():
    rng = np.random.default_rng(1)
    images = rng.random((5, 8, 9))
    image, weight = tcbf.shift_and_sum(images, np.zeros((5, 2)), upsample=1)
    np.testing.assert_allclose(image, images.mean(axis=0), rtol=1e-12)
    assert np.all(weight == 5)


def test_tcbf_command_end_to_end(tmp_path, home, run_xpr):
    data = simulate(scan_size=SCAN, defocus_A=80.0)
    data_file = write_pypty_h5(tmp_path / "sim.h5", dict(data, settings=_blind(data["settings"])))
    settings = write_settings(tmp_path / "mine.yaml", "tcbf", data_file, tcbf={"upsample": 1})
    result = run_xpr(["em", "tcbf", settings])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/tcbf/test.h5", "r") as f:
        assert f["defocus_A"][()] == pytest.approx(80.0, rel=0.1)
        assert f["pixel_size_A"][()] == pytest.approx(data["settings"]["scan_step_A"])
        assert f["phase"].shape == SCAN
    assert any(p.name == "tcbf_shifts.png" for p in (home / "data/em/tcbf").rglob("*.png"))


def test_tcbf_on_the_multislice_tutorial_data(tmp_path, home, run_xpr):
    """The chain `simulate_4dstem tutorial tcbf tutorial`: MoS2, 2 slices, Poisson noise."""
    result = run_xpr(["-q", "em", "simulate_4dstem", "tutorial", "tcbf", "tutorial"])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/simulate_4dstem/tutorial.h5", "r") as f:
        true_defocus = float(f.attrs["defocus"]) - float(np.ravel(f.attrs["aberrations"])[0])
    with h5py.File(home / "data/em/tcbf/tutorial.h5", "r") as f:
        assert f["defocus_A"][()] == pytest.approx(true_defocus, rel=0.10)   # measured 57.7 of 60 Å
