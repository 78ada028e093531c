"""Magnetic phase: the Fourier-space formula against the uniformly magnetised disk, and the
electrostatic/magnetic separation of `xpr em tie` from a flip series."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from xpr.backend import Backend
from xpr.em.tie import specimens
from xpr.em.tie.solvers import rms_error_in_window

HBAR = 6.62607015e-34 / (2 * math.pi)


def cli(args):
    from click.testing import CliRunner

    from xpr.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _disk(shape=(512, 512), pixel=2e-9, radius=60e-9, thickness=20e-9, magnetisation=8e5,
          angle=0.6):
    profile = specimens.disk_profile(shape, pixel, radius)
    m_x, m_y = specimens.uniformly_magnetised_disk(profile, magnetisation, angle)
    fourier = specimens.magnetic_phase_from_magnetisation(Backend(False, "double"), m_x, m_y,
                                                          thickness, pixel)
    analytic = specimens.analytic_disk_magnetic_phase(shape, pixel, radius, thickness,
                                                      magnetisation, angle)
    return fourier, analytic


def test_fourier_magnetic_phase_matches_analytic_disk():
    fourier, analytic = _disk()
    y, x = specimens.pixel_coordinates_m(fourier.shape, 2e-9)
    near = np.hypot(x, y) < 120e-9                         # the disk and twice its radius
    difference = (fourier - analytic)[near]
    difference -= difference.mean()
    peak = np.abs(analytic).max()
    assert peak == pytest.approx(math.pi * specimens.MU_0 * 8e5 * 20e-9 * 60e-9
                                 / specimens.FLUX_QUANTUM_H_OVER_E, rel=0.02)
    assert np.sqrt(np.mean(difference ** 2)) < 0.03 * peak


def test_phase_gradient_inside_disk_is_half_the_infinite_film_value():
    """∇φ_m inside a uniformly magnetised disk is e B0 t / (2ħ), perpendicular to M: the
    projected stray field cancels half of the film's e B0 t / ħ (Beleggia & Zhu, Φ0 = h/e)."""
    angle = 0.6
    fourier, _ = _disk(angle=angle)
    y, x = specimens.pixel_coordinates_m(fourier.shape, 2e-9)
    inside = np.hypot(x, y) < 40e-9
    design = np.stack([x[inside], y[inside], np.ones(inside.sum())], axis=1)
    (g_x, g_y, _), *_ = np.linalg.lstsq(design, fourier[inside], rcond=None)
    expected = 1.602176634e-19 * specimens.MU_0 * 8e5 * 20e-9 / (2 * HBAR)
    # φ = −(π B0 t/Φ0) (y cos β − x sin β): gradient (sin β, −cos β) · e B0 t / 2ħ
    assert g_x == pytest.approx(expected * math.sin(angle), rel=0.02)
    assert g_y == pytest.approx(-expected * math.cos(angle), rel=0.02)


def test_reversed_magnetisation_reverses_the_phase():
    forward, _ = _disk(shape=(128, 128), radius=40e-9)
    backward, _ = _disk(shape=(128, 128), radius=40e-9, angle=0.6 + math.pi)
    np.testing.assert_allclose(backward, -forward, atol=1e-9 * np.abs(forward).max())


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory):
    """The magnetic-disk tutorial chain (256², ±5 µm, flip series, 1 % shot noise)."""
    home = tmp_path_factory.mktemp("home") / "home"
    assert cli(["--setup_home", home]).exit_code == 0
    result = cli(["--home", home, "-q", "em", "simulate_focal", "tutorial", "tie", "tutorial"])
    assert result.exit_code == 0, result.output
    return home


def test_flip_series_separates_magnetic_phase(flip_run):
    with h5py.File(flip_run / "data/em/tie/tutorial.h5") as out, \
         h5py.File(flip_run / "data/em/simulate_focal/tutorial.h5") as truth:
        magnetic = out["phase_magnetic"][()]
        electrostatic = out["phase_electrostatic"][()]
        exact_magnetic = truth["exact_phase_magnetic"][()]
        exact_electrostatic = truth["exact_phase_electrostatic"][()]
        stored = out["errors/rms_magnetic_refined_rad"][()]
    assert np.abs(exact_magnetic).max() > 0.15          # a magnetic phase worth separating
    error_magnetic = rms_error_in_window(magnetic, exact_magnetic, 0.35)
    assert error_magnetic <= 0.05
    assert stored == pytest.approx(error_magnetic, rel=1e-4)
    assert rms_error_in_window(electrostatic, exact_electrostatic, 0.35) <= 0.05
    # without the flip series the total phase's magnetic part would be inseparable: the
    # electrostatic phase alone misses the magnetic one by its full size
    assert rms_error_in_window(electrostatic, exact_electrostatic + exact_magnetic, 0.35) > 0.05
