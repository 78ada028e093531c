"""`xpr em dpc`: integrated centre-of-mass phase of a known phase object."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from xpr.backend import cpu
from xpr.em.ptychography import dpc
from xpr.em.ptychography.calibration import Experiment

from ._direct_data import correlation, simulate, truth_on_scan_grid, write_pypty_h5, write_settings

SCAN = (24, 24)


@pytest.mark.parametrize("pl_rotation_deg, dose, minimum", [
    (0.0, None, 0.93),        # measured 0.957
    (25.0, 2e4, 0.88),        # measured 0.90, 20 000 electrons per pattern
])
def test_dpc_recovers_phase_object(pl_rotation_deg, dose, minimum):
    data = simulate(scan_size=SCAN, pl_rotation_deg=pl_rotation_deg, dose=dose)
    experiment = Experiment.from_settings(dict(data["settings"], PLRotation_deg="auto"), data["patterns"])
    phase = dpc.reconstruct(experiment, cpu())["phase"]
    truth = truth_on_scan_grid(data, SCAN)
    assert correlation(phase, truth) >= minimum


def test_dpc_needs_the_right_rotation():
    """A 90° error in the PL rotation turns the gradient into a curl: the structure is lost."""
    data = simulate(scan_size=SCAN, pl_rotation_deg=0.0)
    truth = truth_on_scan_grid(data, SCAN)
    wrong = Experiment.from_settings(dict(data["settings"], PLRotation_deg=90.0), data["patterns"])
    assert abs(correlation(dpc.reconstruct(wrong, cpu())["phase"], truth)) < 0.3


def test_gradient_integration_is_exact_for_a_periodic_field():
    """∇ of a band-limited periodic φ, integrated: φ back to round-off."""
    n, step = 32, 0.5
    y, x = np.meshgrid(np.arange(n) * step, np.arange(n) * step, indexing="ij")
    period = n * step
    phi = np.sin(2 * np.pi * 3 * x / period) * np.cos(2 * np.pi * 2 * y / period)
    g_x = 2 * np.pi * 3 / period * np.cos(2 * np.pi * 3 * x / period) * np.cos(2 * np.pi * 2 * y / period)
    g_y = -2 * np.pi * 2 / period * np.sin(2 * np.pi * 3 * x / period) * np.sin(2 * np.pi * 2 * y / period)
    back = dpc.integrate_gradient(g_y, g_x, step, cpu(), pad_factor=1)
    np.testing.assert_allclose(back, phi - phi.mean(), atol=1e-5)


def test_dpc_command_end_to_end(tmp_path, home, run_xpr):
    data = simulate(scan_size=SCAN, pl_rotation_deg=10.0)
    data_file = write_pypty_h5(tmp_path / "sim.h5", data)
    settings = write_settings(tmp_path / "mine.yaml", "dpc", data_file)
    result = run_xpr(["em", "dpc", settings])
    assert result.exit_code == 0, result.output
    with h5py.File(home / "data/em/dpc/test.h5", "r") as f:
        phase = f["phase"][()]
        assert f["pixel_size_A"][()] == pytest.approx(data["settings"]["scan_step_A"])
        assert f["calibration/PLRotation_deg"][()] == pytest.approx(10.0, abs=1.0)
    assert correlation(phase, truth_on_scan_grid(data, SCAN)) >= 0.9


def test_dpc_command_rejects_inconsistent_scan(tmp_path, home, run_xpr):
    data = simulate(scan_size=(8, 8))
    data_file = write_pypty_h5(tmp_path / "sim.h5", data, calibration_in_file=False)
    settings = write_settings(tmp_path / "bad.yaml", "dpc", data_file)
    settings_tree = dict(data["settings"], scan_size=[8, 9], data_path=str(data_file))
    import yaml
    settings.write_text(yaml.safe_dump({"structure_name": "test", "experiment": settings_tree}))
    result = run_xpr(["em", "dpc", settings])
    assert result.exit_code == 2
    assert "experiment.scan_size" in result.output and "64 patterns" in result.output
    missing = dict(settings_tree, scan_size=[8, 8], acc_voltage=None)
    settings.write_text(yaml.safe_dump({"structure_name": "test", "experiment": missing}))
    result = run_xpr(["em", "dpc", settings])
    assert result.exit_code == 2 and "experiment.acc_voltage" in result.output
